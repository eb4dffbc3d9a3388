"""The embedded default's 73 tasks, domain by domain: an instruction and a generator of examples each.
"""

from __future__ import annotations

from pipeline.embedded.vocabulary import (
    ADJECTIVES, ANIMALS, COLOURS, COUNTRIES, ELEMENTS, MONTHS, NOUNS, OPPOSITES, VERB_FORMS, VERBS, VOWELS, WEEKDAYS,
    WORDS, Task, amount, clock, listed, number_word, numbers, present, sentence, words,
)


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

