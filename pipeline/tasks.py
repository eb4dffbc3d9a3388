"""The embedded default's instruction data: 73 tasks in six domains, generated from a seed.

No archive can be withdrawn from under it: every example is made here, from
the word and fact tables below and Python's seeded Mersenne Twister, so the
same seed gives the same records on any machine (`SUITE_SHA256` pins them;
`fetch` checks it). Each task is one instruction (the task's definition) and a
generator of (input, references) pairs; the first reference is the response
trained on, every reference counts for ROUGE-L and exact match.

Six domains, each a different skill, so that a teacher can grow one expert per
domain: `arithmetic` (numbers), `text` (letters of words), `lists` (ordering
and picking items), `language` (English morphology and sentence grammar),
`facts` (world knowledge: geography, chemistry, animals) and `time` (calendar,
clock and unit conversions). Of each domain's tasks, the last two or three are
unseen tasks (`heldout`): related to its training tasks (a triple beside a
double, the day before beside the day after) but never trained on, as
Super-NaturalInstructions evaluates unseen tasks. Nearly every answer is a
word, a number or a short list; a few tasks rewrite a sentence.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Callable, Sequence

from pipeline.seeding import derive_seed

DOMAINS = ("arithmetic", "text", "lists", "language", "facts", "time")
# sha256 of `suite_bytes(generate_suite(SEED, EXAMPLES_PER_TASK))`: a change to the tasks, or a platform on
# which they come out differently, shows as a mismatch (tests/test_tasks.py, `moekd fetch`).
SEED = 0
EXAMPLES_PER_TASK = 240
SUITE_SHA256 = "15a070a0fdddc71cb5d826bcfb31d6a962a90051d4ee323eeb80d2f6062a814a"


class Draw:
    """Seeded draws built on `random.Random.random()` alone: for a given integer seed, Python guarantees
    that sequence across versions, which it does not for `randrange`, `choice` or `shuffle`."""

    def __init__(self, seed: int):
        self.random = random.Random(seed).random

    def below(self, n: int) -> int:
        return min(int(self.random() * n), n - 1)

    def integer(self, low: int, high: int) -> int:
        """A uniform integer in [low, high]."""
        return low + self.below(high - low + 1)

    def choice(self, items: Sequence):
        return items[self.below(len(items))]

    def sample(self, items: Sequence, k: int) -> list:
        """k distinct items, in drawn order (a partial Fisher-Yates shuffle)."""
        pool = list(items)
        for i in range(k):
            j = i + self.below(len(pool) - i)
            pool[i], pool[j] = pool[j], pool[i]
        return pool[:k]


Example = tuple[str, list[str]]  # (input, references: the first is the response)


@dataclass(frozen=True)
class Task:
    name: str  # "domain/task"
    instruction: str
    make: Callable[[Draw], Example]
    heldout: bool = False  # an unseen task: never in the training or validation split

    @property
    def domain(self) -> str:
        return self.name.split("/")[0]


# ---------------------------------------------------------------- tables (facts as commonly taught)

# country, capital(s), continent(s), language(s) (None: several official ones, left out of that task)
COUNTRIES = [
    ("France", ["Paris"], ["Europe"], ["French"]),
    ("Germany", ["Berlin"], ["Europe"], ["German"]),
    ("Italy", ["Rome"], ["Europe"], ["Italian"]),
    ("Spain", ["Madrid"], ["Europe"], ["Spanish"]),
    ("Portugal", ["Lisbon"], ["Europe"], ["Portuguese"]),
    ("the United Kingdom", ["London"], ["Europe"], ["English"]),
    ("Ireland", ["Dublin"], ["Europe"], ["English", "Irish"]),
    ("the Netherlands", ["Amsterdam"], ["Europe"], ["Dutch"]),
    ("Belgium", ["Brussels"], ["Europe"], None),
    ("Sweden", ["Stockholm"], ["Europe"], ["Swedish"]),
    ("Norway", ["Oslo"], ["Europe"], ["Norwegian"]),
    ("Denmark", ["Copenhagen"], ["Europe"], ["Danish"]),
    ("Finland", ["Helsinki"], ["Europe"], ["Finnish", "Swedish"]),
    ("Poland", ["Warsaw"], ["Europe"], ["Polish"]),
    ("Greece", ["Athens"], ["Europe"], ["Greek"]),
    ("Austria", ["Vienna"], ["Europe"], ["German"]),
    ("Switzerland", ["Bern"], ["Europe"], None),
    ("the Czech Republic", ["Prague"], ["Europe"], ["Czech"]),
    ("Hungary", ["Budapest"], ["Europe"], ["Hungarian"]),
    ("Ukraine", ["Kyiv", "Kiev"], ["Europe"], ["Ukrainian"]),
    ("Romania", ["Bucharest"], ["Europe"], ["Romanian"]),
    ("Japan", ["Tokyo"], ["Asia"], ["Japanese"]),
    ("China", ["Beijing"], ["Asia"], ["Chinese", "Mandarin"]),
    ("India", ["New Delhi"], ["Asia"], None),
    ("South Korea", ["Seoul"], ["Asia"], ["Korean"]),
    ("Thailand", ["Bangkok"], ["Asia"], ["Thai"]),
    ("Vietnam", ["Hanoi"], ["Asia"], ["Vietnamese"]),
    ("Indonesia", ["Jakarta"], ["Asia"], ["Indonesian"]),
    ("the Philippines", ["Manila"], ["Asia"], None),
    ("Iran", ["Tehran"], ["Asia"], ["Persian", "Farsi"]),
    ("Iraq", ["Baghdad"], ["Asia"], ["Arabic"]),
    ("Saudi Arabia", ["Riyadh"], ["Asia"], ["Arabic"]),
    ("Pakistan", ["Islamabad"], ["Asia"], None),
    ("Bangladesh", ["Dhaka"], ["Asia"], ["Bengali", "Bangla"]),
    ("Nepal", ["Kathmandu"], ["Asia"], ["Nepali"]),
    ("Malaysia", ["Kuala Lumpur"], ["Asia"], ["Malay"]),
    ("Mongolia", ["Ulaanbaatar"], ["Asia"], ["Mongolian"]),
    ("Egypt", ["Cairo"], ["Africa"], ["Arabic"]),
    ("Kenya", ["Nairobi"], ["Africa"], None),
    ("Nigeria", ["Abuja"], ["Africa"], ["English"]),
    ("Ethiopia", ["Addis Ababa"], ["Africa"], None),
    ("Morocco", ["Rabat"], ["Africa"], None),
    ("Ghana", ["Accra"], ["Africa"], ["English"]),
    ("Algeria", ["Algiers"], ["Africa"], None),
    ("Senegal", ["Dakar"], ["Africa"], ["French"]),
    ("Uganda", ["Kampala"], ["Africa"], None),
    ("the United States", ["Washington, D.C.", "Washington"], ["North America"], ["English"]),
    ("Canada", ["Ottawa"], ["North America"], None),
    ("Mexico", ["Mexico City"], ["North America"], ["Spanish"]),
    ("Cuba", ["Havana"], ["North America"], ["Spanish"]),
    ("Jamaica", ["Kingston"], ["North America"], ["English"]),
    ("Brazil", ["Brasília", "Brasilia"], ["South America"], ["Portuguese"]),
    ("Argentina", ["Buenos Aires"], ["South America"], ["Spanish"]),
    ("Chile", ["Santiago"], ["South America"], ["Spanish"]),
    ("Peru", ["Lima"], ["South America"], None),
    ("Colombia", ["Bogotá", "Bogota"], ["South America"], ["Spanish"]),
    ("Venezuela", ["Caracas"], ["South America"], ["Spanish"]),
    ("Ecuador", ["Quito"], ["South America"], ["Spanish"]),
    ("Uruguay", ["Montevideo"], ["South America"], ["Spanish"]),
    ("Australia", ["Canberra"], ["Oceania", "Australia"], ["English"]),
    ("New Zealand", ["Wellington"], ["Oceania", "Australia"], None),
    ("Fiji", ["Suva"], ["Oceania", "Australia"], None),
]

# name, symbol, atomic number
ELEMENTS = [
    ("hydrogen", "H", 1), ("helium", "He", 2), ("lithium", "Li", 3), ("beryllium", "Be", 4), ("boron", "B", 5),
    ("carbon", "C", 6), ("nitrogen", "N", 7), ("oxygen", "O", 8), ("fluorine", "F", 9), ("neon", "Ne", 10),
    ("sodium", "Na", 11), ("magnesium", "Mg", 12), ("aluminium", "Al", 13), ("silicon", "Si", 14),
    ("phosphorus", "P", 15), ("sulfur", "S", 16), ("chlorine", "Cl", 17), ("argon", "Ar", 18),
    ("potassium", "K", 19), ("calcium", "Ca", 20), ("titanium", "Ti", 22), ("chromium", "Cr", 24),
    ("manganese", "Mn", 25), ("iron", "Fe", 26), ("cobalt", "Co", 27), ("nickel", "Ni", 28), ("copper", "Cu", 29),
    ("zinc", "Zn", 30), ("bromine", "Br", 35), ("krypton", "Kr", 36), ("silver", "Ag", 47), ("tin", "Sn", 50),
    ("iodine", "I", 53), ("xenon", "Xe", 54), ("tungsten", "W", 74), ("platinum", "Pt", 78), ("gold", "Au", 79),
    ("mercury", "Hg", 80), ("lead", "Pb", 82), ("radium", "Ra", 88), ("uranium", "U", 92),
]

# animal, class, legs (None: not a plain count), young (None: no common name)
ANIMALS = [
    ("dog", "mammal", 4, "puppy"), ("cat", "mammal", 4, "kitten"), ("cow", "mammal", 4, "calf"),
    ("horse", "mammal", 4, "foal"), ("sheep", "mammal", 4, "lamb"), ("pig", "mammal", 4, "piglet"),
    ("goat", "mammal", 4, "kid"), ("lion", "mammal", 4, "cub"), ("tiger", "mammal", 4, "cub"),
    ("bear", "mammal", 4, "cub"), ("fox", "mammal", 4, "cub"), ("wolf", "mammal", 4, "pup"),
    ("deer", "mammal", 4, "fawn"), ("elephant", "mammal", 4, "calf"), ("giraffe", "mammal", 4, "calf"),
    ("zebra", "mammal", 4, "foal"), ("mouse", "mammal", 4, "pup"), ("rabbit", "mammal", 4, None),
    ("whale", "mammal", 0, "calf"), ("dolphin", "mammal", 0, "calf"), ("kangaroo", "mammal", None, "joey"),
    ("chicken", "bird", 2, "chick"), ("duck", "bird", 2, "duckling"), ("goose", "bird", 2, "gosling"),
    ("swan", "bird", 2, "cygnet"), ("eagle", "bird", 2, "eaglet"), ("owl", "bird", 2, "owlet"),
    ("penguin", "bird", 2, "chick"), ("parrot", "bird", 2, "chick"), ("sparrow", "bird", 2, None),
    ("salmon", "fish", 0, "fry"), ("trout", "fish", 0, "fry"), ("shark", "fish", 0, "pup"),
    ("tuna", "fish", 0, None), ("goldfish", "fish", 0, "fry"),
    ("snake", "reptile", 0, "hatchling"), ("lizard", "reptile", 4, "hatchling"),
    ("turtle", "reptile", 4, "hatchling"), ("crocodile", "reptile", 4, "hatchling"),
    ("frog", "amphibian", 4, "tadpole"), ("toad", "amphibian", 4, "tadpole"),
    ("ant", "insect", 6, "larva"), ("bee", "insect", 6, "larva"), ("butterfly", "insect", 6, "caterpillar"),
    ("beetle", "insect", 6, "larva"), ("fly", "insect", 6, "maggot"), ("spider", "arachnid", 8, "spiderling"),
    ("scorpion", "arachnid", 8, None),
]

COLOURS = [
    ("a banana", "yellow"), ("a lemon", "yellow"), ("grass", "green"), ("a clear sky", "blue"),
    ("snow", "white"), ("milk", "white"), ("coal", "black"), ("blood", "red"), ("a ripe tomato", "red"),
    ("a strawberry", "red"), ("a carrot", "orange"), ("a pumpkin", "orange"), ("chocolate", "brown"),
    ("a lime", "green"), ("a cucumber", "green"), ("an eggplant", "purple"), ("a polar bear", "white"),
    ("a crow", "black"), ("a fire truck", "red"), ("a school bus", "yellow"), ("a flamingo", "pink"),
    ("the sea", "blue"), ("a frog", "green"), ("an orange", "orange"), ("a cherry", "red"),
    ("a raven", "black"), ("a canary", "yellow"), ("a swan", "white"), ("a blueberry", "blue"),
    ("a plum", "purple"), ("a coconut shell", "brown"), ("a ripe raspberry", "red"),
]

OPPOSITES = [
    ("hot", ["cold"]), ("cold", ["hot"]), ("big", ["small", "little"]), ("small", ["big", "large"]),
    ("tall", ["short"]), ("fast", ["slow"]), ("slow", ["fast", "quick"]), ("happy", ["sad", "unhappy"]),
    ("sad", ["happy"]), ("good", ["bad"]), ("bad", ["good"]), ("early", ["late"]), ("late", ["early"]),
    ("full", ["empty"]), ("empty", ["full"]), ("high", ["low"]), ("low", ["high"]), ("loud", ["quiet", "soft"]),
    ("quiet", ["loud", "noisy"]), ("open", ["closed", "shut"]), ("closed", ["open"]), ("rich", ["poor"]),
    ("poor", ["rich"]), ("strong", ["weak"]), ("weak", ["strong"]), ("thick", ["thin"]), ("wet", ["dry"]),
    ("dry", ["wet"]), ("clean", ["dirty"]), ("dirty", ["clean"]), ("cheap", ["expensive"]),
    ("expensive", ["cheap", "inexpensive"]), ("wide", ["narrow"]), ("narrow", ["wide", "broad"]),
    ("deep", ["shallow"]), ("shallow", ["deep"]), ("near", ["far"]), ("far", ["near", "close"]),
    ("young", ["old"]), ("alive", ["dead"]), ("dead", ["alive", "living"]), ("safe", ["dangerous", "unsafe"]),
    ("dangerous", ["safe"]), ("heavy", ["light"]), ("long", ["short"]), ("true", ["false"]), ("false", ["true"]),
    ("first", ["last"]), ("last", ["first"]), ("awake", ["asleep"]), ("asleep", ["awake"]),
    ("inside", ["outside"]), ("outside", ["inside"]), ("above", ["below"]), ("below", ["above"]),
    ("sweet", ["sour", "bitter"]), ("friendly", ["unfriendly", "hostile"]), ("brave", ["cowardly", "afraid"]),
    ("noisy", ["quiet"]), ("smooth", ["rough"]), ("rough", ["smooth"]), ("tight", ["loose"]),
    ("loose", ["tight"]), ("sharp", ["dull", "blunt"]), ("careful", ["careless"]), ("polite", ["rude", "impolite"]),
    ("rude", ["polite"]), ("easy", ["hard", "difficult"]), ("difficult", ["easy"]), ("begin", ["end", "finish"]),
    ("win", ["lose"]), ("lose", ["win", "find"]), ("buy", ["sell"]), ("sell", ["buy"]), ("push", ["pull"]),
    ("pull", ["push"]), ("arrive", ["leave", "depart"]), ("remember", ["forget"]), ("forget", ["remember"]),
]

# singular, plural
NOUNS = [
    ("cat", "cats"), ("dog", "dogs"), ("book", "books"), ("tree", "trees"), ("car", "cars"), ("house", "houses"),
    ("apple", "apples"), ("chair", "chairs"), ("river", "rivers"), ("bird", "birds"), ("box", "boxes"),
    ("fox", "foxes"), ("bus", "buses"), ("glass", "glasses"), ("dish", "dishes"), ("church", "churches"),
    ("watch", "watches"), ("class", "classes"), ("city", "cities"), ("baby", "babies"), ("party", "parties"),
    ("story", "stories"), ("lady", "ladies"), ("day", "days"), ("boy", "boys"), ("key", "keys"), ("toy", "toys"),
    ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("wife", "wives"), ("life", "lives"),
    ("half", "halves"), ("shelf", "shelves"), ("loaf", "loaves"), ("potato", "potatoes"),
    ("tomato", "tomatoes"), ("hero", "heroes"), ("child", "children"), ("man", "men"), ("woman", "women"),
    ("mouse", "mice"), ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"), ("person", "people"),
    ("ox", "oxen"), ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"), ("bench", "benches"),
    ("brush", "brushes"), ("wish", "wishes"), ("cherry", "cherries"), ("puppy", "puppies"), ("pony", "ponies"),
    ("monkey", "monkeys"), ("window", "windows"), ("garden", "gardens"), ("pencil", "pencils"),
    ("teacher", "teachers"), ("flower", "flowers"), ("table", "tables"), ("bottle", "bottles"),
    ("question", "questions"), ("island", "islands"), ("bridge", "bridges"), ("horse", "horses"),
    ("cloud", "clouds"), ("family", "families"), ("country", "countries"), ("lunch", "lunches"),
]

# base, past, -ing, third person singular
VERBS = [
    ("go", "went", "going", "goes"), ("eat", "ate", "eating", "eats"), ("run", "ran", "running", "runs"),
    ("see", "saw", "seeing", "sees"), ("take", "took", "taking", "takes"), ("write", "wrote", "writing", "writes"),
    ("sing", "sang", "singing", "sings"), ("swim", "swam", "swimming", "swims"),
    ("drink", "drank", "drinking", "drinks"), ("speak", "spoke", "speaking", "speaks"),
    ("give", "gave", "giving", "gives"), ("come", "came", "coming", "comes"), ("make", "made", "making", "makes"),
    ("buy", "bought", "buying", "buys"), ("think", "thought", "thinking", "thinks"),
    ("bring", "brought", "bringing", "brings"), ("teach", "taught", "teaching", "teaches"),
    ("catch", "caught", "catching", "catches"), ("sleep", "slept", "sleeping", "sleeps"),
    ("keep", "kept", "keeping", "keeps"), ("feel", "felt", "feeling", "feels"),
    ("leave", "left", "leaving", "leaves"), ("find", "found", "finding", "finds"),
    ("tell", "told", "telling", "tells"), ("sell", "sold", "selling", "sells"), ("sit", "sat", "sitting", "sits"),
    ("stand", "stood", "standing", "stands"), ("fly", "flew", "flying", "flies"),
    ("drive", "drove", "driving", "drives"), ("ride", "rode", "riding", "rides"),
    ("begin", "began", "beginning", "begins"), ("break", "broke", "breaking", "breaks"),
    ("choose", "chose", "choosing", "chooses"), ("fall", "fell", "falling", "falls"),
    ("forget", "forgot", "forgetting", "forgets"), ("grow", "grew", "growing", "grows"),
    ("know", "knew", "knowing", "knows"), ("throw", "threw", "throwing", "throws"),
    ("draw", "drew", "drawing", "draws"), ("wear", "wore", "wearing", "wears"), ("read", "read", "reading", "reads"),
    ("cut", "cut", "cutting", "cuts"), ("play", "played", "playing", "plays"), ("walk", "walked", "walking", "walks"),
    ("jump", "jumped", "jumping", "jumps"), ("cook", "cooked", "cooking", "cooks"),
    ("dance", "danced", "dancing", "dances"), ("stop", "stopped", "stopping", "stops"),
    ("plan", "planned", "planning", "plans"), ("try", "tried", "trying", "tries"), ("cry", "cried", "crying", "cries"),
    ("study", "studied", "studying", "studies"), ("carry", "carried", "carrying", "carries"),
    ("open", "opened", "opening", "opens"), ("climb", "climbed", "climbing", "climbs"),
    ("laugh", "laughed", "laughing", "laughs"), ("wash", "washed", "washing", "washes"),
    ("watch", "watched", "watching", "watches"), ("fix", "fixed", "fixing", "fixes"),
    ("help", "helped", "helping", "helps"), ("call", "called", "calling", "calls"), ("live", "lived", "living", "lives"),
    ("smile", "smiled", "smiling", "smiles"), ("clap", "clapped", "clapping", "claps"), ("have", "had", "having", "has"),
]

# adjective, comparative, superlative
ADJECTIVES = [
    ("big", "bigger", "biggest"), ("small", "smaller", "smallest"), ("tall", "taller", "tallest"),
    ("fast", "faster", "fastest"), ("slow", "slower", "slowest"), ("happy", "happier", "happiest"),
    ("easy", "easier", "easiest"), ("hot", "hotter", "hottest"), ("cold", "colder", "coldest"),
    ("good", "better", "best"), ("bad", "worse", "worst"), ("young", "younger", "youngest"),
    ("old", "older", "oldest"), ("long", "longer", "longest"), ("short", "shorter", "shortest"),
    ("strong", "stronger", "strongest"), ("weak", "weaker", "weakest"), ("rich", "richer", "richest"),
    ("poor", "poorer", "poorest"), ("thin", "thinner", "thinnest"), ("wide", "wider", "widest"),
    ("large", "larger", "largest"), ("nice", "nicer", "nicest"), ("safe", "safer", "safest"),
    ("early", "earlier", "earliest"), ("heavy", "heavier", "heaviest"), ("pretty", "prettier", "prettiest"),
    ("funny", "funnier", "funniest"), ("busy", "busier", "busiest"), ("sad", "sadder", "saddest"),
    ("wet", "wetter", "wettest"), ("loud", "louder", "loudest"), ("quiet", "quieter", "quietest"),
    ("clean", "cleaner", "cleanest"), ("dark", "darker", "darkest"), ("bright", "brighter", "brightest"),
    ("deep", "deeper", "deepest"), ("soft", "softer", "softest"), ("hard", "harder", "hardest"),
    ("cheap", "cheaper", "cheapest"), ("warm", "warmer", "warmest"), ("cool", "cooler", "coolest"),
    ("high", "higher", "highest"), ("low", "lower", "lowest"), ("kind", "kinder", "kindest"),
    ("smart", "smarter", "smartest"), ("fat", "fatter", "fattest"), ("angry", "angrier", "angriest"),
]

NAMES = ["Anna", "Ben", "Carla", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
         "Mia", "Noah", "Olivia", "Paul", "Rosa", "Sam", "Tina", "Victor"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
# verb (base form), objects it takes: the sentence tasks' vocabulary
ACTIONS = [
    ("eat", ["an apple", "the bread", "a sandwich", "the soup"]), ("read", ["a book", "the letter", "a story"]),
    ("write", ["a letter", "a poem", "the report"]), ("play", ["the piano", "football", "a game"]),
    ("watch", ["a film", "the birds", "the game"]), ("cook", ["dinner", "the rice", "the eggs"]),
    ("drink", ["tea", "a glass of milk", "the coffee"]), ("buy", ["a hat", "bread", "a new bike"]),
    ("sing", ["a song", "the anthem"]), ("draw", ["a map", "a horse", "a picture"]),
    ("wash", ["the car", "the dishes", "the dog"]), ("carry", ["the bags", "a box"]),
    ("open", ["the door", "the window", "a present"]), ("find", ["the keys", "a coin"]),
    ("catch", ["the ball", "a fish", "the bus"]), ("fix", ["the bike", "the chair"]),
]
PLACES = ["at home", "in the park", "at school", "in the garden", "in the kitchen", "after lunch", "every morning",
          "on Sunday"]


def _words() -> list[str]:
    """Plain lowercase words of 3 to 9 letters from the tables above, for the letter and list tasks."""
    pool = {w for w, _ in NOUNS} | {v[0] for v in VERBS} | {a[0] for a in ADJECTIVES} | {a[0] for a in ANIMALS}
    pool |= {w for w, _ in OPPOSITES} | {e[0] for e in ELEMENTS}
    return sorted(w for w in pool if w.isalpha() and 3 <= len(w) <= 9)


WORDS = _words()
VOWELS = set("aeiou")


# ---------------------------------------------------------------- helpers of the generators

def listed(items) -> str:
    return ", ".join(str(i) for i in items)


def numbers(d: Draw, low: int = 1, high: int = 99, count: tuple[int, int] = (4, 7)) -> list[int]:
    return d.sample(range(low, high + 1), d.integer(*count))


def words(d: Draw, count: tuple[int, int] = (3, 6)) -> list[str]:
    return d.sample(WORDS, d.integer(*count))


def number_word(n: int) -> str:
    ones = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
            "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
    tens = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
    if n < 20:
        return ones[n]
    return tens[n // 10] + ("" if n % 10 == 0 else "-" + ones[n % 10])


def subject(d: Draw) -> tuple[str, bool]:
    """(a sentence's subject, whether it takes a third-person singular verb)."""
    kind = d.below(3)
    if kind == 0:
        return d.choice(NAMES), True
    if kind == 1:
        first, second = d.sample(NAMES, 2)
        return f"{first} and {second}", False
    return d.choice(["I", "We", "They", "You"]), False


def sentence(d: Draw) -> tuple[str, str, bool, str]:
    """(subject, verb, third person, the rest) of a simple present-tense sentence."""
    who, third = subject(d)
    verb, objects = d.choice(ACTIONS)
    return who, verb, third, f"{d.choice(objects)} {d.choice(PLACES)}"


VERB_FORMS = {v[0]: v for v in VERBS}


def present(verb: str, third: bool) -> str:
    return VERB_FORMS[verb][3] if third else verb


def amount(n: int, unit: str) -> str:
    """"1 day", "2 days": `unit` is singular."""
    return f"{n} {unit}" if n == 1 else f"{n} {unit}s"


def clock(hour: int) -> str:
    return f"{(hour - 1) % 12 + 1} o'clock"


# ---------------------------------------------------------------- the tasks, domain by domain

def _arithmetic() -> list[Task]:
    def add(d):
        a, b = d.integer(10, 99), d.integer(10, 99)
        return f"{a} + {b}", [str(a + b)]

    def subtract(d):
        a, b = sorted((d.integer(10, 99), d.integer(1, 99)), reverse=True)
        return f"{a} - {b}", [str(a - b)]

    def multiply(d):
        a, b = d.integer(2, 9), d.integer(2, 19)
        return f"{a} x {b}", [str(a * b)]

    def double(d):
        a = d.integer(2, 250)
        return str(a), [str(2 * a)]

    def half(d):
        a = 2 * d.integer(2, 250)
        return str(a), [str(a // 2)]

    def parity(d):
        a = d.integer(1, 999)
        return str(a), ["even" if a % 2 == 0 else "odd"]

    def larger(d):
        a, b = d.sample(range(1, 1000), 2)
        return f"{a} and {b}", [str(max(a, b))]

    def round_ten(d):
        a = d.integer(11, 989)
        while a % 10 == 5:
            a = d.integer(11, 989)
        return str(a), [str(int(round(a / 10)) * 10)]

    def plus_ten(d):
        a = d.integer(1, 989)
        return str(a), [str(a + 10)]

    def digit_sum(d):
        a = d.integer(10, 9999)
        return str(a), [str(sum(int(c) for c in str(a)))]

    def triple(d):
        a = d.integer(2, 150)
        return str(a), [str(3 * a)]

    def smaller(d):
        a, b = d.sample(range(1, 1000), 2)
        return f"{a} and {b}", [str(min(a, b))]

    def add_three(d):
        a, b, c = d.integer(2, 60), d.integer(2, 60), d.integer(2, 60)
        return f"{a} + {b} + {c}", [str(a + b + c)]

    return [
        Task("arithmetic/add", "Add the two numbers. Answer with the number only.", add),
        Task("arithmetic/subtract", "Subtract the second number from the first. Answer with the number only.",
             subtract),
        Task("arithmetic/multiply", "Multiply the two numbers. Answer with the number only.", multiply),
        Task("arithmetic/double", "Double the number. Answer with the number only.", double),
        Task("arithmetic/half", "What is half of this number? Answer with the number only.", half),
        Task("arithmetic/parity", "Is the number even or odd? Answer with \"even\" or \"odd\".", parity),
        Task("arithmetic/larger", "Which of the two numbers is larger? Answer with that number.", larger),
        Task("arithmetic/round_to_ten", "Round the number to the nearest ten. Answer with the number only.",
             round_ten),
        Task("arithmetic/plus_ten", "Add ten to the number. Answer with the number only.", plus_ten),
        Task("arithmetic/digit_sum", "What is the sum of the digits of this number? Answer with the number only.",
             digit_sum),
        Task("arithmetic/triple", "Triple the number (multiply it by three). Answer with the number only.", triple,
             heldout=True),
        Task("arithmetic/smaller", "Which of the two numbers is smaller? Answer with that number.", smaller,
             heldout=True),
        Task("arithmetic/add_three", "Add the three numbers. Answer with the number only.", add_three, heldout=True),
    ]


def _text() -> list[Task]:
    def word(d):
        return d.choice(WORDS)

    def reverse(d):
        w = word(d)
        return w, [w[::-1]]

    def upper(d):
        w = word(d)
        return w, [w.upper()]

    def first_letter(d):
        w = word(d)
        return w, [w[0]]

    def last_letter(d):
        w = word(d)
        return w, [w[-1]]

    def length(d):
        w = word(d)
        return w, [str(len(w)), number_word(len(w))]

    def spell(d):
        w = word(d)
        return w, ["-".join(w)]

    def no_vowels(d):
        w = word(d)
        while all(c in VOWELS for c in w):
            w = word(d)
        return w, ["".join(c for c in w if c not in VOWELS)]

    def count_vowels(d):
        w = word(d)
        n = sum(c in VOWELS for c in w)
        return w, [str(n), number_word(n)]

    def capitalise(d):
        w = word(d)
        return w, [w.capitalize()]

    def second_letter(d):
        w = word(d)
        return w, [w[1]]

    def title_case(d):
        ws = words(d, (2, 4))
        return " ".join(ws), [" ".join(w.capitalize() for w in ws)]

    def count_consonants(d):
        w = word(d)
        n = sum(c not in VOWELS for c in w)
        return w, [str(n), number_word(n)]

    return [
        Task("text/reverse", "Write the word backwards, letter by letter.", reverse),
        Task("text/uppercase", "Write the word in capital letters.", upper),
        Task("text/first_letter", "What is the first letter of the word? Answer with the letter only.",
             first_letter),
        Task("text/last_letter", "What is the last letter of the word? Answer with the letter only.", last_letter),
        Task("text/length", "How many letters does the word have? Answer with the number only.", length),
        Task("text/spell", "Spell the word with a hyphen between its letters.", spell),
        Task("text/remove_vowels", "Write the word without its vowels (a, e, i, o, u).", no_vowels),
        Task("text/count_vowels", "How many vowels (a, e, i, o, u) does the word have? Answer with the number only.",
             count_vowels),
        Task("text/capitalise", "Write the word with its first letter in capitals.", capitalise),
        Task("text/second_letter", "What is the second letter of the word? Answer with the letter only.",
             second_letter, heldout=True),
        Task("text/title_case", "Write the words with the first letter of each in capitals.", title_case,
             heldout=True),
        Task("text/count_consonants", "How many consonants (letters that are not a, e, i, o, u) does the word "
             "have? Answer with the number only.", count_consonants, heldout=True),
    ]


def _lists() -> list[Task]:
    def sort_numbers(d):
        ns = numbers(d)
        return listed(ns), [listed(sorted(ns))]

    def sort_words(d):
        ws = words(d)
        return listed(ws), [listed(sorted(ws))]

    def maximum(d):
        ns = numbers(d)
        return listed(ns), [str(max(ns))]

    def count(d):
        ws = words(d, (2, 9))
        return listed(ws), [str(len(ws)), number_word(len(ws))]

    def first(d):
        ws = words(d)
        return listed(ws), [ws[0]]

    def last(d):
        ws = words(d)
        return listed(ws), [ws[-1]]

    def reverse(d):
        ws = words(d)
        return listed(ws), [listed(ws[::-1])]

    def deduplicate(d):
        ws = words(d, (3, 5))
        repeated = ws + d.sample(ws, d.integer(1, len(ws)))
        mixed = d.sample(repeated, len(repeated))
        seen = list(dict.fromkeys(mixed))
        return listed(mixed), [listed(seen)]

    def longest(d):
        ws = words(d)
        while sorted(len(w) for w in ws)[-1] == sorted(len(w) for w in ws)[-2]:
            ws = words(d)
        return listed(ws), [max(ws, key=len)]

    def sort_descending(d):
        ns = numbers(d)
        return listed(ns), [listed(sorted(ns, reverse=True))]

    def minimum(d):
        ns = numbers(d)
        return listed(ns), [str(min(ns))]

    def second(d):
        ws = words(d)
        return listed(ws), [ws[1]]

    return [
        Task("lists/sort_numbers", "Sort the numbers from smallest to largest.", sort_numbers),
        Task("lists/sort_words", "Sort the words in alphabetical order.", sort_words),
        Task("lists/maximum", "What is the largest number in the list? Answer with the number only.", maximum),
        Task("lists/count", "How many items are in the list? Answer with the number only.", count),
        Task("lists/first", "What is the first item of the list? Answer with the item only.", first),
        Task("lists/last", "What is the last item of the list? Answer with the item only.", last),
        Task("lists/reverse", "Write the list in reverse order.", reverse),
        Task("lists/deduplicate", "Write the list without repeated items, keeping the first time each appears.",
             deduplicate),
        Task("lists/longest", "Which word in the list is the longest? Answer with the word only.", longest),
        Task("lists/sort_descending", "Sort the numbers from largest to smallest.", sort_descending, heldout=True),
        Task("lists/minimum", "What is the smallest number in the list? Answer with the number only.", minimum,
             heldout=True),
        Task("lists/second", "What is the second item of the list? Answer with the item only.", second,
             heldout=True),
    ]


def _language() -> list[Task]:
    def plural(d):
        singular, many = d.choice(NOUNS)
        return singular, [many]

    def past(d):
        verb = d.choice(VERBS)
        return verb[0], [verb[1]]

    def opposite(d):
        word, answers = d.choice(OPPOSITES)
        return word, answers

    def comparative(d):
        adjective = d.choice(ADJECTIVES)
        return adjective[0], [adjective[1]]

    def ing(d):
        verb = d.choice(VERBS)
        return verb[0], [verb[2]]

    def third_person(d):
        verb = d.choice(VERBS)
        return verb[0], [verb[3]]

    def past_sentence(d):
        who, verb, third, rest = sentence(d)
        return f"{who} {present(verb, third)} {rest}.", [f"{who} {VERB_FORMS[verb][1]} {rest}."]

    def negative(d):
        who, verb, third, rest = sentence(d)
        return f"{who} {present(verb, third)} {rest}.", [f"{who} {'does' if third else 'do'} not {verb} {rest}."]

    def progressive(d):
        who, verb, third, rest = sentence(d)
        be = "is" if third else ("am" if who == "I" else "are")
        return f"{who} {present(verb, third)} {rest}.", [f"{who} {be} {VERB_FORMS[verb][2]} {rest}."]

    def superlative(d):
        adjective = d.choice(ADJECTIVES)
        return adjective[0], [adjective[2]]

    def singular(d):
        one, many = d.choice(NOUNS)
        return many, [one]

    def question(d):
        who, verb, third, rest = sentence(d)
        asked = {"I": "you", "You": "I", "We": "we", "They": "they"}.get(who, who)
        return f"{who} {present(verb, third)} {rest}.", [f"{'Does' if third else 'Do'} {asked} {verb} {rest}?"]

    return [
        Task("language/plural", "Write the plural of the noun.", plural),
        Task("language/past_tense", "Write the past tense of the verb.", past),
        Task("language/opposite", "Write the opposite of the word.", opposite),
        Task("language/comparative", "Write the comparative form of the adjective (as in tall, taller).", comparative),
        Task("language/ing_form", "Write the -ing form of the verb.", ing),
        Task("language/third_person", "Write the form of the verb that follows \"he\" or \"she\" in the present "
             "tense.", third_person),
        Task("language/past_sentence", "Rewrite the sentence in the past tense.", past_sentence),
        Task("language/negative", "Rewrite the sentence in the negative.", negative),
        Task("language/progressive", "Rewrite the sentence in the present continuous (is/are ...ing).", progressive),
        Task("language/superlative", "Write the superlative form of the adjective (as in tall, tallest).",
             superlative, heldout=True),
        Task("language/singular", "Write the singular of the noun.", singular, heldout=True),
        Task("language/question", "Turn the sentence into a yes/no question.", question, heldout=True),
    ]


def _facts() -> list[Task]:
    def capital(d):
        country, capitals, _, _ = d.choice(COUNTRIES)
        return country, capitals

    def continent(d):
        country, _, continents, _ = d.choice(COUNTRIES)
        return country, continents

    def language(d):
        country, _, _, languages = d.choice([c for c in COUNTRIES if c[3]])
        return country, languages

    def symbol(d):
        name, sign, _ = d.choice(ELEMENTS)
        return name, [sign]

    def atomic_number(d):
        name, _, number = d.choice(ELEMENTS)
        return name, [str(number)]

    def animal_class(d):
        animal, kind, _, _ = d.choice(ANIMALS)
        return animal, [kind]

    def legs(d):
        animal, _, count, _ = d.choice([a for a in ANIMALS if a[2] is not None])
        return animal, [str(count), number_word(count)]

    def young(d):
        animal, _, _, baby = d.choice([a for a in ANIMALS if a[3]])
        return animal, [baby]

    def colour(d):
        thing, colour_name = d.choice(COLOURS)
        return thing, [colour_name]

    def country_of_capital(d):
        country, capitals, _, _ = d.choice(COUNTRIES)
        return capitals[0], list(dict.fromkeys([country, country.removeprefix("the ")]))

    def element_of_symbol(d):
        name, sign, _ = d.choice(ELEMENTS)
        return sign, [name] + (["aluminum"] if name == "aluminium" else [])

    def is_mammal(d):
        animal, kind, _, _ = d.choice(ANIMALS)
        return animal, ["yes" if kind == "mammal" else "no"]

    return [
        Task("facts/capital", "What is the capital city of this country? Answer with the city only.", capital),
        Task("facts/continent", "On which continent is this country? Answer with the continent only.", continent),
        Task("facts/language", "What language do most people speak in this country? Answer with the language only.",
             language),
        Task("facts/element_symbol", "What is the chemical symbol of this element?", symbol),
        Task("facts/atomic_number", "What is the atomic number of this element? Answer with the number only.",
             atomic_number),
        Task("facts/animal_class", "Is this animal a mammal, bird, fish, reptile, amphibian, insect or arachnid?",
             animal_class),
        Task("facts/legs", "How many legs does this animal have? Answer with the number only.", legs),
        Task("facts/young", "What is the young of this animal called? Answer with one word.", young),
        Task("facts/colour", "What colour is it? Answer with the colour only.", colour),
        Task("facts/country_of_capital", "This city is the capital of which country? Answer with the country only.",
             country_of_capital, heldout=True),
        Task("facts/element_of_symbol", "Which chemical element has this symbol? Answer with its name only.",
             element_of_symbol, heldout=True),
        Task("facts/is_mammal", "Is this animal a mammal? Answer with \"yes\" or \"no\".", is_mammal, heldout=True),
    ]


def _time() -> list[Task]:
    def day_after(d):
        start, n = d.below(7), d.integer(1, 13)
        return f"{amount(n, 'day')} after {WEEKDAYS[start]}", [WEEKDAYS[(start + n) % 7]]

    def month_after(d):
        start, n = d.below(12), d.integer(1, 11)
        return f"{amount(n, 'month')} after {MONTHS[start]}", [MONTHS[(start + n) % 12]]

    def scaled(unit: str, per: int, low: int = 1, high: int = 60):
        def make(d):
            n = d.integer(low, high)
            return amount(n, unit), [str(n * per)]
        return make

    def clock_after(d):
        hour, n = d.integer(1, 12), d.integer(1, 11)
        return f"{amount(n, 'hour')} after {clock(hour)}", [clock(hour + n)]

    def longer(d):
        hours = d.integer(1, 5)
        minutes = d.integer(30, 330)
        while minutes == 60 * hours:
            minutes = d.integer(30, 330)
        pair = [amount(hours, "hour"), amount(minutes, "minute")]
        first = d.below(2)
        return f"{pair[first]} or {pair[1 - first]}", [pair[0] if 60 * hours > minutes else pair[1]]

    def day_before(d):
        start, n = d.below(7), d.integer(1, 13)
        return f"{amount(n, 'day')} before {WEEKDAYS[start]}", [WEEKDAYS[(start - n) % 7]]

    def clock_before(d):
        hour, n = d.integer(1, 12), d.integer(1, 11)
        return f"{amount(n, 'hour')} before {clock(hour)}", [clock(hour - n)]

    return [
        Task("time/day_after", "Which day of the week is it? Answer with the day only.", day_after),
        Task("time/month_after", "Which month is it? Answer with the month only.", month_after),
        Task("time/weeks_to_days", "How many days are in this many weeks? Answer with the number only.",
             scaled("week", 7)),
        Task("time/days_to_hours", "How many hours are in this many days? Answer with the number only.",
             scaled("day", 24)),
        Task("time/hours_to_minutes", "How many minutes are in this many hours? Answer with the number only.",
             scaled("hour", 60)),
        Task("time/years_to_months", "How many months are in this many years? Answer with the number only.",
             scaled("year", 12)),
        Task("time/metres_to_centimetres", "How many centimetres are in this many metres? Answer with the number "
             "only.", scaled("metre", 100, 1, 99)),
        Task("time/clock_after", "What time will it be? Answer like \"3 o'clock\".", clock_after),
        Task("time/longer", "Which is the longer time? Answer with it as written.", longer),
        Task("time/day_before", "Which day of the week was it? Answer with the day only.", day_before, heldout=True),
        Task("time/clock_before", "What time was it? Answer like \"3 o'clock\".", clock_before, heldout=True),
        Task("time/kilograms_to_grams", "How many grams are in this many kilograms? Answer with the number only.",
             scaled("kilogram", 1000, 1, 99), heldout=True),
    ]


TASKS: tuple[Task, ...] = (*_arithmetic(), *_text(), *_lists(), *_language(), *_facts(), *_time())


# ---------------------------------------------------------------- the suite

def task_examples(task: Task, seed: int, count: int) -> list[Example]:
    """Up to `count` examples of `task` with distinct inputs, drawn from a generator seeded by (seed, task).

    A task with fewer possible inputs (a fact table) gives them all; drawing
    stops after 50 draws per wanted example.
    """
    draw = Draw(derive_seed("tasks", seed, task.name))
    examples: dict[str, list[str]] = {}
    for _ in range(50 * count):
        if len(examples) == count:
            break
        text, references = task.make(draw)
        examples.setdefault(text, references)
    return list(examples.items())


def generate_suite(seed: int = SEED, per_task: int = EXAMPLES_PER_TASK) -> list[dict]:
    """Every task's examples as records of the `prepare` input format, task after task, plus each
    record's `domain` and `heldout` (an unseen task)."""
    return [
        {"instruction": task.instruction, "context": text, "response": references[0], "references": references,
         "source": task.name, "domain": task.domain, "heldout": task.heldout}
        for task in TASKS
        for text, references in task_examples(task, seed, per_task)
    ]


def suite_bytes(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records).encode()


def suite_sha256(records: list[dict]) -> str:
    return hashlib.sha256(suite_bytes(records)).hexdigest()
