"""One lifecycle for everything a stage writes: make it, reuse or resume it, refuse it, or replace it.

A stage knows what it would make as an identity: JSON data of everything the
output depends on (its settings, and its inputs by content). What an output
already holds is the identity recorded when it was made: `None` where there is
nothing yet, `FOREIGN` where something is there that records none. `judge`
compares the two as JSON reads them back, and says what to do:

- `NEW`: nothing there: make it;
- `SAME`: this very output, finished or not: reuse it, or resume it;
- `REPLACE`: another output, and `overwrite`: make this one in its place;

and refuses another output without `overwrite`, in one line naming each
setting that differs (`differences`) and how to go on. What only says where
an input lies (a model's path and folder name) is no part of an identity
compared here: callers compare models by content (`models.identity.content`).
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import MoekdError
from pipeline.core.files import read_json

FOREIGN: dict = {}  # what an output that records no identity holds
REPLACE_IT = "use --overwrite (overwrite=true) to replace it, or choose another output"


class Verdict(enum.Enum):
    NEW = "new"  # nothing there: make it
    SAME = "same"  # this very output: reuse it, or resume it
    REPLACE = "replace"  # another one, and overwrite: make this one in its place


@dataclass(frozen=True)
class Output:
    """An output as a refusal names it: `location`, what another one there is (`holds`, after the location:
    "holds a run with other settings"), what one that records no identity is (`unrecorded`; `holds` if None),
    where its recorded values come from (`side`: "the run", in "x is 1 in the run but 2 now") and how to go on
    (`remedy`)."""

    location: object
    holds: str
    side: str = "the output"
    unrecorded: str | None = None
    remedy: str = REPLACE_IT

    def refusal(self, recorded: dict, wanted: dict) -> MoekdError:
        """The one-line refusal of an output holding `recorded` where `wanted` was asked for."""
        if not recorded and self.unrecorded:
            return MoekdError(f"{self.location} {self.unrecorded}; {self.remedy}")
        return MoekdError(f"{self.location} {self.holds}; {self.remedy}. What differs: "
                          + "; ".join(differences(recorded, wanted, self.side)))


def judge(output: Output, recorded: dict | None, wanted: dict, overwrite: bool) -> Verdict:
    """What to do with `output`, which holds `recorded` (None: nothing; `FOREIGN`: something that records no
    identity), where `wanted` is what this run makes: `Verdict.NEW`, `SAME` or (with `overwrite`) `REPLACE`;
    another output without `overwrite` is refused (`Output.refusal`)."""
    if recorded is None:
        return Verdict.NEW
    recorded, wanted = as_json(recorded), as_json(wanted)
    if recorded and recorded == wanted:
        return Verdict.SAME
    if overwrite:
        return Verdict.REPLACE
    raise output.refusal(recorded, wanted)


def as_json(data):
    """`data` as it reads back from JSON (tuples become lists), so that comparisons are fair."""
    return json.loads(json.dumps(data, sort_keys=True))


def differences(old, new, side: str = "the output", prefix: str = "") -> list[str]:
    """One line per dotted key whose value differs between two JSON values, with both values."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [line for key in sorted(set(old) | set(new))
                for line in differences(old.get(key, "<absent>"), new.get(key, "<absent>"), side, f"{prefix}{key}.")]
    if old == new:
        return []
    return [f"{prefix.rstrip('.')} is {old!r} in {side} but {new!r} now"]


def recorded_in(directory: Path, report: str, unrecorded: dict | None = FOREIGN) -> dict | None:
    """The JSON object `directory` records itself in, its file `report`: None where the directory does not
    exist, `unrecorded` where it has no such file (by default `FOREIGN`: something is there that records
    nothing). A report that is not a JSON object records nothing."""
    directory = Path(directory)
    if not directory.exists():
        return None
    if not (directory / report).is_file():
        return unrecorded
    record = read_json(directory / report, report)
    return record if isinstance(record, dict) else FOREIGN
