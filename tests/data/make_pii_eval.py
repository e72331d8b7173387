"""Writes pii_eval.jsonl: realistic sentences with planted PII (labelled spans) and hard negatives (numbers that
fail Luhn or mod-97, SSN-shaped numbers never issued, version strings shaped like IPs, dates, order numbers).

Values are generated, not detected: cards and IBANs get their check digits computed here, so the labels do not
depend on the detectors under test. Seeded, so the file is reproducible: `python tests/data/make_pii_eval.py`."""

from __future__ import annotations

import base64
import json
import random
import string
from pathlib import Path

rng = random.Random(20261123)
OUT = Path(__file__).with_name("pii_eval.jsonl")

FIRST = ["anna", "ben", "chloe", "dmitri", "elif", "farah", "goran", "hana", "ivan", "julia", "kwame", "lena"]
LAST = ["smith", "nguyen", "okafor", "muller", "rossi", "tanaka", "garcia", "kowalski", "haddad", "berg"]
DOMAINS = ["example.com", "mail.example.org", "corp.example.net", "uni-example.edu", "example.co.uk"]


def luhn_digit(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def card(valid: bool = True) -> str:
    prefix, length = rng.choice([("4", 16), ("51", 16), ("55", 16), ("2221", 16), ("34", 15), ("37", 15),
                                 ("6011", 16), ("35", 16)])
    body = prefix + "".join(rng.choice(string.digits) for _ in range(length - len(prefix) - 1))
    check = luhn_digit(body)
    if not valid:
        check = str((int(check) + rng.randint(1, 9)) % 10)
    digits = body + check
    style = rng.choice(["plain", "space", "dash"])
    if style == "plain":
        return digits
    groups = [digits[0:4], digits[4:10], digits[10:]] if length == 15 else [digits[i:i + 4] for i in range(0, 16, 4)]
    return (" " if style == "space" else "-").join(groups)


IBAN_FORMATS = {"DE": "18n", "GB": "4a14n", "FR": "23c", "NL": "4a10n", "ES": "20n", "IT": "1a22c", "BE": "12n",
                "CH": "17c", "AT": "16n", "PL": "24n"}


def iban(valid: bool = True) -> str:
    country = rng.choice(list(IBAN_FORMATS))
    spec = IBAN_FORMATS[country]
    bban = ""
    parts = spec.split("a") if "a" in spec else [spec]
    if "a" in spec:
        bban += "".join(rng.choice(string.ascii_uppercase) for _ in range(int(parts[0])))
        rest = parts[1]
    else:
        rest = parts[0]
    n, kind = int(rest[:-1]), rest[-1]
    alphabet = string.digits if kind == "n" else string.digits + string.ascii_uppercase
    bban += "".join(rng.choice(alphabet) for _ in range(n))
    number = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    check = 98 - number % 97
    if not valid:
        check = (check + rng.randint(1, 96)) % 97 or 1
        check = max(check, 2)
    compact = f"{country}{check:02d}{bban}"
    if rng.random() < 0.6:
        return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
    return compact


def ssn(valid: bool = True) -> str:
    if valid:
        area = rng.choice([a for a in range(1, 900) if a != 666])
        group, serial = rng.randint(1, 99), rng.randint(1, 9999)
    else:
        area, group, serial = rng.choice([(0, rng.randint(1, 99), rng.randint(1, 9999)),
                                          (666, rng.randint(1, 99), rng.randint(1, 9999)),
                                          (rng.randint(900, 999), rng.randint(1, 99), rng.randint(1, 9999)),
                                          (rng.randint(1, 665), 0, rng.randint(1, 9999)),
                                          (rng.randint(1, 665), rng.randint(1, 99), 0)])
    return f"{area:03d}-{group:02d}-{serial:04d}"


def email() -> str:
    sep = rng.choice([".", "_", "", "-"])
    local = f"{rng.choice(FIRST)}{sep}{rng.choice(LAST)}" + (str(rng.randint(1, 99)) if rng.random() < 0.3 else "")
    if rng.random() < 0.15:
        local += "+news"
    return f"{local}@{rng.choice(DOMAINS)}"


def phone() -> str:
    kind = rng.choice(["us1", "us2", "us3", "gb", "de", "fr"])
    line = f"{rng.randint(100, 199):04d}"
    area = rng.choice(["415", "212", "617", "312", "206", "512"])
    exchange = rng.choice(["555", "262", "448", "731", "864"])
    if kind == "us1":
        return f"({area}) {exchange}-{line}"
    if kind == "us2":
        return f"+1 {area}-{exchange}-{line}"
    if kind == "us3":
        return f"{area}.{exchange}.{line}"
    if kind == "gb":
        return f"+44 20 7946 {rng.randint(0, 999):04d}"
    if kind == "de":
        return f"+49 30 {rng.randint(1000000, 9999999)}"
    return f"+33 1 {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)} {rng.randint(10, 99)}"


def ip() -> str:
    if rng.random() < 0.7:
        return ".".join(str(rng.randint(1, 254)) for _ in range(4))
    groups = [f"{rng.randint(0, 65535):x}" for _ in range(rng.choice([4, 8]))]
    return "2001:db8::" + ":".join(groups[:4]) if len(groups) == 4 else ":".join(groups)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def secret() -> str:
    kind = rng.choice(["aws", "apl", "jwt", "ghp", "pem"])
    alnum = string.ascii_letters + string.digits
    if kind == "aws":
        return "AKIA" + "".join(rng.choice(string.ascii_uppercase + string.digits) for _ in range(16))
    if kind == "apl":
        return "apl_" + "".join(rng.choice(alnum) for _ in range(48))
    if kind == "ghp":
        return "ghp_" + "".join(rng.choice(alnum) for _ in range(36))
    if kind == "jwt":
        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        claims = b64(json.dumps({"sub": str(rng.randint(1000, 9999)), "name": rng.choice(FIRST)}).encode())
        return f"{header}.{claims}.{b64(rng.randbytes(32))}"
    lines = "\n".join(b64(rng.randbytes(48)) for _ in range(3))
    return f"-----BEGIN PRIVATE KEY-----\n{lines}\n-----END PRIVATE KEY-----"


MAKERS = {"email": email, "phone": phone, "credit_card": card, "iban": iban, "us_ssn": ssn, "ip_address": ip,
          "secret": secret}
TEMPLATES = {
    "email": ["Please forward the contract to {} before Friday.", "Reply-To: {}", "Contact {} for access.",
              "I emailed {} twice but got no answer."],
    "phone": ["Call me back on {} after 5pm.", "Support line: {}.", "You can reach the site manager at {}",
              "Her mobile is {}, landline unknown."],
    "credit_card": ["Charge the card {} for the renewal.", "Card number: {} exp 09/27", "I paid with {} yesterday.",
                    "Refund to {} please."],
    "iban": ["Please transfer the deposit to IBAN {} by Monday.", "Bank details: {} (Sparkasse)",
             "Wire to {} with reference INV-2291.", "Our account {} changed last month."],
    "us_ssn": ["SSN: {}", "Employee social security number {} on the W-2.", "Her SSN is {}, verify it.",
               "Applicant SSN {} attached."],
    "ip_address": ["Login from {} was blocked.", "The server at {} stopped answering.", "allow {} in the firewall",
                   "Requests from {} spiked at noon."],
    "secret": ["export AWS_ACCESS_KEY_ID={}", "Authorization: Bearer {}", "Here is the key:\n{}\nkeep it safe",
               "token = \"{}\""],
}
NEGATIVES = [
    lambda: f"Order #{rng.randint(10**7, 10**8)} shipped on 2024-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}.",
    lambda: f"Upgrade to version {rng.randint(1, 9)}.{rng.randint(0, 20)}.{rng.randint(0, 20)}.{rng.randint(0, 99)}"
            " before the deadline.",
    lambda: f"Release v{rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)} fixes the bug.",
    lambda: f"The meeting is at {rng.randint(10, 23)}:{rng.randint(10, 59)}:{rng.randint(10, 59)} UTC.",
    lambda: f"Reference {card(valid=False)} was rejected by the bank.",
    lambda: f"Invalid IBAN {iban(valid=False)} in the form.",
    lambda: f"Form field shows {ssn(valid=False)} which is not a real SSN.",
    lambda: f"Total: {rng.randint(1000, 99999)}.{rng.randint(10, 99)} EUR for {rng.randint(2, 40)} items.",
    lambda: f"Ticket ABC-{rng.randint(1000, 9999)} is assigned to the platform team.",
    lambda: f"The build hash is {''.join(rng.choice('0123456789abcdef') for _ in range(40))}.",
    lambda: f"Coordinates 52.{rng.randint(1000, 9999)}, 13.{rng.randint(1000, 9999)} mark the depot.",
    lambda: "Use the @channel mention sparingly; see wiki/page@v2 for details.",
    lambda: f"ISBN 978-{rng.randint(0, 9)}-{rng.randint(100, 999)}-{rng.randint(10000, 99999)}-{rng.randint(0, 9)}",
]


def record(kinds: list[str]) -> dict[str, object]:
    text, entities = "", []
    for kind in kinds:
        if text:
            text += " "
        if kind == "negative":
            text += rng.choice(NEGATIVES)()
            continue
        value = MAKERS[kind]()
        template = rng.choice(TEMPLATES[kind])
        before, after = template.split("{}")
        start = len(text) + len(before)
        text += before + value + after
        entities.append({"type": kind, "start": start, "end": start + len(value), "value": value})
    return {"text": text, "entities": entities}


def main() -> None:
    rows = []
    for kind in MAKERS:
        for _ in range(60):
            rows.append(record([kind, *rng.sample([*MAKERS, "negative", "negative"], rng.randint(0, 2))]))
    rows += [record(["negative", "negative"]) for _ in range(200)]
    rng.shuffle(rows)
    OUT.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} records to {OUT}")


if __name__ == "__main__":
    main()
