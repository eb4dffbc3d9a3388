"""What the embedded default's tasks are made of: word and fact tables, seeded draws, phrasing helpers.
"""

from __future__ import annotations

import random
from dataclasses import KW_ONLY, dataclass
from typing import Callable, Sequence


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
    _: KW_ONLY
    heldout: bool = False  # an unseen task: never in the training or validation split

    @property
    def domain(self) -> str:
        return self.name.split("/")[0]


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

