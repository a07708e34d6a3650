#!/usr/bin/env python3
"""The privacy filter's evaluation corpus, generated with Faker (pinned in test-requirements.txt).

Every personal value comes from Faker's own providers (phone_number, credit_card_number for each
card type, iban, email, ssn, ipv4, ipv6), in the locale it belongs to, and is set in a sentence
of that locale's Faker text with a short lead-in people write before such a value ("Telefon:",
"my card number is"). The scanner's authors did not write the values: Faker did, and the test
judges each one. A second, clean corpus holds numbers that are not personal data (order ids,
dates, prices, versions, timestamps, coordinates, counts, barcodes), also from Faker, to measure
false redactions.

The corpus is a pure function of the arguments: the defaults (seed and sizes) are the
evaluation, so the generated file is never committed. Usage:

    pii-corpus.py OUT.json [--seed N] [--per-locale N] [--clean N]

OUT.json: {"pii": [{"locale", "entity", "kind", "value", "text"}], "clean": [{"kind", "text"}]}.
"""

import argparse
import datetime
import json
import random
import sys

from faker import Faker

# The corpus locales: North America, the UK and six EU countries.
LOCALES = ["en_US", "en_CA", "en_GB", "de_DE", "fr_FR", "nl_NL", "it_IT", "es_ES", "pl_PL"]

# Every card type Faker issues, Maestro (12 digits) included.
CARD_TYPES = ["maestro", "mastercard", "visa13", "visa16", "visa19", "amex", "discover", "diners", "jcb15", "jcb16"]

# What people write before a value, per language: `{}` is the value.
LEAD_INS = {
    "en": {
        "phone": ["Call me on {}", "my phone number is {}", "Tel: {}", "mobile {}", "you can reach me at {}",
                  "Phone: {}", "text me at {}", "fax {}"],
        "card": ["my card number is {}", "charged to {}", "Card: {}", "{}"],
        "iban": ["IBAN {}", "wire it to {}", "{}"],
        "email": ["email me at {}", "Contact: {}", "{}"],
        "ssn": ["SSN {}", "my social security number is {}", "{}"],
        "ip": ["the server at {}", "from IP {}", "{}"],
    },
    "de": {
        "phone": ["Rufen Sie mich unter {} an", "Telefon: {}", "Tel. {}", "Handy: {}", "Mobil {}",
                  "telefonisch unter {}", "Fax: {}"],
        "card": ["Kartennummer {}", "Kreditkarte: {}", "{}"],
        "iban": ["IBAN: {}", "überweisen Sie auf {}", "{}"],
        "email": ["E-Mail: {}", "schreiben Sie an {}", "{}"],
        "ip": ["Server {}", "IP-Adresse {}", "{}"],
    },
    "fr": {
        "phone": ["Appelez-moi au {}", "téléphone : {}", "Tél. {}", "portable {}", "tel: {}", "fax : {}"],
        "card": ["numéro de carte {}", "carte bancaire : {}", "{}"],
        "iban": ["IBAN : {}", "virement sur {}", "{}"],
        "email": ["courriel : {}", "écrivez à {}", "{}"],
        "ip": ["le serveur {}", "adresse IP {}", "{}"],
    },
    "nl": {
        "phone": ["Bel me op {}", "telefoon: {}", "Tel. {}", "mobiel {}", "telefoonnummer {}"],
        "card": ["kaartnummer {}", "creditcard: {}", "{}"],
        "iban": ["IBAN {}", "overmaken naar {}", "{}"],
        "email": ["e-mail: {}", "mail naar {}", "{}"],
        "ip": ["de server {}", "IP-adres {}", "{}"],
    },
    "it": {
        "phone": ["Chiamami al {}", "telefono: {}", "Tel. {}", "cellulare {}", "cell. {}"],
        "card": ["numero della carta {}", "carta di credito: {}", "{}"],
        "iban": ["IBAN {}", "bonifico su {}", "{}"],
        "email": ["email: {}", "scrivete a {}", "{}"],
        "ip": ["il server {}", "indirizzo IP {}", "{}"],
    },
    "es": {
        "phone": ["Llámame al {}", "teléfono: {}", "Tel. {}", "móvil {}", "tlf. {}"],
        "card": ["número de tarjeta {}", "tarjeta: {}", "{}"],
        "iban": ["IBAN {}", "transferencia a {}", "{}"],
        "email": ["correo: {}", "escríbeme a {}", "{}"],
        "ip": ["el servidor {}", "dirección IP {}", "{}"],
    },
    "pl": {
        "phone": ["Zadzwoń pod {}", "telefon: {}", "tel. {}", "komórka {}", "nr tel. {}"],
        "card": ["numer karty {}", "karta: {}", "{}"],
        "iban": ["IBAN {}", "przelew na {}", "{}"],
        "email": ["e-mail: {}", "napisz na {}", "{}"],
        "ip": ["serwer {}", "adres IP {}", "{}"],
    },
}

# Dates and times are drawn from this span, not up to "now", so that the corpus is the same on
# any day it is generated.
SPAN = (datetime.datetime(1980, 1, 1), datetime.datetime(2026, 1, 1))

# Entities per text, by weight: phones weigh most, as they vary most by locale.
ENTITY_WEIGHTS = {"phone": 9, "card": 6, "iban": 2, "email": 2, "ssn": 4, "ipv4": 1, "ipv6": 1}


def value(fake, entity, i):
    """A value of `entity` from Faker's own provider; returns (kind, value)."""
    if entity == "phone":
        return "phone_number", fake.phone_number()
    if entity == "card":
        kind = CARD_TYPES[i % len(CARD_TYPES)]
        return kind, fake.credit_card_number(card_type=kind)
    if entity == "iban":
        return "iban", fake.iban()
    if entity == "email":
        return "email", fake.email()
    if entity == "ssn":
        return "ssn", fake.ssn()
    if entity == "ipv4":
        return "ipv4", fake.ipv4()
    return "ipv6", fake.ipv6()


def pii_texts(seed, per_locale):
    """`per_locale` texts per locale, each holding one value."""
    out = []
    for n, locale in enumerate(LOCALES):
        fake = Faker(locale)
        fake.seed_instance(seed + n)
        rng = random.Random(seed * 1000 + n)
        leads = LEAD_INS[locale[:2]]
        # A US social security number is what the scanner knows; other locales' `ssn` providers
        # make national ids (NIR, PESEL, codice fiscale) the scanner does not claim to find.
        weights = {e: w for e, w in ENTITY_WEIGHTS.items() if e != "ssn" or locale == "en_US"}
        entities = list(weights)
        for i in range(per_locale):
            entity = rng.choices(entities, [weights[e] for e in entities])[0]
            kind, v = value(fake, entity, i)
            lead = rng.choice(leads["ip" if entity.startswith("ip") else entity])
            text = f"{fake.sentence()} {lead.format(v)}{rng.choice(['.', ',', '', ';'])} {fake.sentence()}"
            out.append({"locale": locale, "entity": entity, "kind": kind, "value": v, "text": text})
    return out


def clean_value(fake, rng):
    """A number that is not personal data, and what it is."""
    kind = rng.choice(
        ["order", "invoice", "date", "datetime", "price", "version", "timestamp", "coordinates", "count",
         "ean", "postcode", "amount", "duration"]
    )
    if kind == "order":
        return kind, f"order #{fake.random_number(digits=rng.randint(5, 14), fix_len=True)}"
    if kind == "invoice":
        return kind, f"invoice {fake.bothify('??-####-######').upper()}"
    if kind == "date":
        pattern = rng.choice(["%Y-%m-%d", "%d.%m.%Y", "%d/%m/%Y", "%m/%d/%Y", "%Y%m%d"])
        return kind, fake.date_time_between(*SPAN).strftime(pattern)
    if kind == "datetime":
        return kind, fake.date_time_between(*SPAN).isoformat(sep=rng.choice([" ", "T"]))
    if kind == "price":
        return kind, fake.pricetag()
    if kind == "version":
        return kind, f"version {fake.numerify('%.#.##')}"
    if kind == "timestamp":
        ts = fake.unix_time(start_datetime=SPAN[0], end_datetime=SPAN[1])
        return kind, f"ts={int(ts * 1000) if rng.random() < 0.5 else int(ts)}"
    if kind == "coordinates":
        return kind, f"{fake.latitude()}, {fake.longitude()}"
    if kind == "count":
        return kind, f"{fake.random_int(0, 10_000_000):,} items"
    if kind == "ean":
        return kind, f"EAN {fake.ean13()}"
    if kind == "postcode":
        return kind, fake.postcode()
    if kind == "amount":
        return kind, f"{fake.pyfloat(left_digits=rng.randint(1, 9), right_digits=2, positive=True)} EUR"
    return kind, f"{fake.random_int(1, 100_000)} ms"


def clean_texts(seed, size):
    """`size` texts, each with a number that is not personal data, across the locales."""
    fakes = [Faker(locale) for locale in LOCALES]
    for n, fake in enumerate(fakes):
        fake.seed_instance(seed + 10_000 + n)
    rng = random.Random(seed + 20_000)
    out = []
    for i in range(size):
        fake = fakes[i % len(fakes)]
        kind, v = clean_value(fake, rng)
        out.append({"kind": kind, "text": f"{fake.sentence()} {v}. {fake.sentence()}"})
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="where to write the corpus (JSON)")
    parser.add_argument("--seed", type=int, default=20261204)
    parser.add_argument("--per-locale", type=int, default=240, help="personal-data texts per locale")
    parser.add_argument("--clean", type=int, default=720, help="texts of numbers that are not personal data")
    args = parser.parse_args()
    corpus = {"pii": pii_texts(args.seed, args.per_locale), "clean": clean_texts(args.seed, args.clean)}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(corpus, f, ensure_ascii=False)
    print(f"{len(corpus['pii'])} texts with personal data, {len(corpus['clean'])} clean", file=sys.stderr)


if __name__ == "__main__":
    main()
