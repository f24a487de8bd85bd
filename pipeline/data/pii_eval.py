"""A labelled PII set built from real code, for precision / recall of the redaction step.

Real standard-library files (chosen because a loose scan finds no address-like text in them) get PII
planted at random line boundaries, in the contexts where code really holds it: comments, string
constants, config dicts, env-style assignments. Files also get *hard negatives* planted (versions,
private and DNS-resolver IPs, UUIDs, sha/md5 digests, base64 data blobs, decorators, asset names)
that must come out untouched. Everything is seeded, so a figure can be reproduced exactly.

Scoring: a planted value is found when it no longer occurs in the redacted text; the redactor's own
per-type counts give the predictions, so anything redacted that was not planted (in the real code or
a hard negative) lowers precision.
"""

from __future__ import annotations

import base64
import ipaddress
import random
import re
import string
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PIIConfig
from pipeline.data.steps.pii import redact_pii

TYPES = ("email", "ip_address", "key")
_LOOSE_EMAIL = re.compile(r"[\w.+-]@[\w-]+\.[\w.]+")
_LOOSE_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_LOOSE_IPV6 = re.compile(r"\b[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}\b")

FIRST = ["anna", "bob", "chen", "dmitri", "elena", "farah", "giulia", "hiro", "ines", "jonas", "kwame", "lea",
         "maria", "nils", "olga", "pedro", "quinn", "ravi", "sofia", "tomas", "uma", "viktor", "wei", "yusuf"]
LAST = ["smith", "garcia", "mueller", "rossi", "tanaka", "nguyen", "kowalski", "okafor", "silva", "dubois",
        "jensen", "novak", "kim", "patel", "ivanova", "haddad"]
DOMAINS = ["gmail.com", "example-corp.com", "mail.acme.io", "uni-heidelberg.de", "cs.stanford.edu",
           "posteo.net", "company.co.uk", "startup.ai", "python.org", "fastmail.fm", "dev.internal-tools.org"]
B64 = string.ascii_letters + string.digits + "+/"
ALNUM = string.ascii_letters + string.digits


@dataclass
class Sample:
    text: str
    planted: list[tuple[str, str]] = field(default_factory=list)  # (type, value that must disappear)
    negatives: list[str] = field(default_factory=list)  # values that must stay


def _rand(rng: random.Random, chars: str, n: int) -> str:
    return "".join(rng.choice(chars) for _ in range(n))


def _email(rng: random.Random) -> str:
    sep = rng.choice([".", "_", "", "-"])
    local = rng.choice(FIRST) + sep + rng.choice(LAST) + rng.choice(["", str(rng.randint(1, 99))])
    return f"{local}@{rng.choice(DOMAINS)}"


def _public_ipv4(rng: random.Random, keep: set[str]) -> str:
    while True:
        ip = ipaddress.IPv4Address(rng.getrandbits(32))
        if ip.is_global and not ip.is_multicast and str(ip) not in keep:
            return str(ip)


def _public_ipv6(rng: random.Random) -> str:
    while True:
        ip = ipaddress.IPv6Address((0x2 << 124) | rng.getrandbits(124) if rng.random() < 0.5
                                   else (0x2a << 120) | (rng.getrandbits(48) << 72) | rng.getrandbits(16))
        if ip.is_global:
            return ip.compressed


def _positive(kind: str, rng: random.Random, keep: set[str]) -> tuple[str, str, str]:
    """(pii type, value, line(s) of code holding it)."""
    if kind == "email":
        e = _email(rng)
        name = rng.choice(FIRST).title() + " " + rng.choice(LAST).title()
        return "email", e, rng.choice([
            f"# Contact: {name} <{e}>", f'__author__ = "{name} <{e}>"', f'    "maintainer": "{e}",',
            f"# Report bugs to {e}.", f"MAIL_FROM = '{e}'", f'send_mail(to=["{e}"], subject="report")',
            f"// author: {e}", f" * @author {name} ({e})", f'<a href="mailto:{e}">{name}</a>',
            f"# [{name}](mailto:{e.upper()})", f"git commit --author='{name} <{e}>'"])
    if kind == "ipv4":
        ip = _public_ipv4(rng, keep)
        return "ip_address", ip, rng.choice([
            f'HOST = "{ip}"', f"# the staging server runs at {ip}:8080", f'conn = connect("{ip}", 22)',
            f'ALLOWED = ["{ip}/32"]', f'url = "http://{ip}/api/v1"', f"const server = '{ip}';"])
    if kind == "ipv6":
        ip = _public_ipv6(rng)
        return "ip_address", ip, rng.choice([f'HOST6 = "{ip}"', f"# reach the box at [{ip}]:443",
                                             f"bind_address = '{ip}'"])
    # keys
    if kind == "aws":
        v = "AKIA" + _rand(rng, string.ascii_uppercase + string.digits, 16)
        return "key", v, rng.choice([f'AWS_ACCESS_KEY_ID = "{v}"', f"aws_access_key_id={v}", f"    key_id='{v}',"])
    if kind == "aws_secret":
        v = _rand(rng, B64, 40)
        return "key", v, rng.choice([f'aws_secret_access_key = "{v}"', f"AWS_SECRET_ACCESS_KEY={v}"])
    if kind == "github":
        v = rng.choice(["ghp_", "gho_"]) + _rand(rng, ALNUM, 36)
        return "key", v, rng.choice([f'GITHUB_TOKEN = "{v}"', f'headers = {{"Authorization": "token {v}"}}',
                                     f"# old token: {v}"])
    if kind == "github_pat":
        v = "github_pat_" + _rand(rng, ALNUM, 22) + "_" + _rand(rng, ALNUM, 59)
        return "key", v, f'gh = Github("{v}")'
    if kind == "slack":
        v = f"xox{rng.choice('abpr')}-{rng.randint(10**9, 10**12)}-{rng.randint(10**9, 10**12)}-{_rand(rng, ALNUM.lower(), 24)}"
        return "key", v, rng.choice([f'SLACK_TOKEN = "{v}"', f"client = WebClient(token='{v}')"])
    if kind == "stripe":
        v = rng.choice(["sk_live_", "rk_live_"]) + _rand(rng, ALNUM, 24)
        return "key", v, rng.choice([f'stripe.api_key = "{v}"', f"STRIPE_KEY = '{v}'"])
    if kind == "jwt":
        def part(obj: str) -> str:
            return base64.urlsafe_b64encode(obj.encode()).decode().rstrip("=")
        v = (part('{"alg":"HS256","typ":"JWT"}') + "." + part(f'{{"sub":"{rng.randint(1, 10**9)}","name":"{rng.choice(FIRST)}"}}')
             + "." + _rand(rng, ALNUM + "_-", 43))
        return "key", v, rng.choice([f'JWT = "{v}"', f"headers['Authorization'] = 'Bearer {v}'"])
    if kind == "bearer":
        v = _rand(rng, ALNUM, rng.choice([32, 40]))
        return "key", v, rng.choice([f'headers = {{"Authorization": "Bearer {v}"}}', f"curl -H 'Authorization: Bearer {v}'"])
    if kind == "url_password":
        v = _rand(rng, ALNUM, rng.randint(10, 20))
        return "key", v, rng.choice([f'DATABASE_URL = "postgres://app:{v}@db.internal:5432/prod"',
                                     f"broker = 'amqp://guest:{v}@mq.example-corp.com//'"])
    if kind == "private_key":
        body = base64.b64encode(rng.randbytes(rng.choice([48 * 6, 48 * 12]))).decode()
        lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
        kind_ = rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
        block = f"-----BEGIN {kind_}PRIVATE KEY-----\n{lines}\n-----END {kind_}PRIVATE KEY-----"
        return "key", body[:64], f'PRIVATE_KEY = """{block}"""'
    # high-entropy string assigned to a secret-ish name
    n = rng.choice([24, 32, 40, 48, 64])
    v = _rand(rng, string.hexdigits.lower()[:16], n) if rng.random() < 0.3 else _rand(rng, ALNUM + "_-", n)
    name = rng.choice(["SECRET_KEY", "api_key", "client_secret", "password", "apiToken", "auth_token",
                       "DB_PASSWORD", "private_key", "access_token"])
    return "key", v, rng.choice([f'{name} = "{v}"', f'    "{name}": "{v}",', f"const {name} = '{v}';",
                                 f"{name}: '{v}'", f"{name}={v}", f"  {name}: {v}"])


def _negative(rng: random.Random) -> tuple[str, str]:
    """(value that must survive, line of code holding it)."""
    kind = rng.randrange(17)
    if kind == 0:
        v = ".".join(str(rng.randint(0, 20)) for _ in range(4))
        return v, rng.choice([f'version = "{v}"', f"__version__ = '{v}'", f"# Version: {v}", f'requires = ["pkg=={v}"]'])
    if kind == 1:
        v = rng.choice(["8.8.8.8", "1.1.1.1", "9.9.9.9", "8.8.4.4", "2001:4860:4860::8888", "2606:4700:4700::1111"])
        return v, f'NAMESERVERS = ["{v}"]'
    if kind == 2:
        v = rng.choice([f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}", f"10.{rng.randint(0, 255)}.0.{rng.randint(1, 254)}",
                        "127.0.0.1", f"172.{rng.randint(16, 31)}.0.1", "203.0.113.7", "fe80::1", "::1", "2001:db8::42"])
        return v, rng.choice([f'LOCAL_HOST = "{v}"', f"# listen on {v}", f"proxy = '{v}'"])
    if kind == 3:
        v = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return v, rng.choice([f'request_id = "{v}"', f'token_id = "{v}"', f'    "auth_uuid": "{v}",'])
    if kind == 4:
        import hashlib

        digest = rng.choice([hashlib.md5, hashlib.sha1, hashlib.sha256, hashlib.sha512])(rng.randbytes(16)).hexdigest()
        return digest, rng.choice([f'sha256 = "{digest}"', f'expected_hash = "{digest}"', f"checksum: '{digest}'",
                                   f'key_digest = "{digest}"', f'commit = "{digest}"', f'cache_key = "{digest}"'])
    if kind == 5:
        v = base64.b64encode(rng.randbytes(rng.randint(600, 1500))).decode()
        return v[:80], rng.choice([f'ICON_PNG = b"{v}"', f'auth_logo = "{v}"', f'FONT_DATA = "{v}"'])
    if kind == 6:
        return "@property", "    @property"
    if kind == 7:
        return "@npmcli/arborist", "const Arborist = require('@npmcli/arborist')"
    if kind == 8:
        return "icon@2x.png", 'ICON = "static/icon@2x.png"'
    if kind == 9:
        return "x@w.T", "y = x@w.T + b"
    if kind == 10:
        return "OID = '1.3.6.1.4.1.311'", "OID = '1.3.6.1.4.1.311'"
    if kind == 11:
        v = "".join(rng.choice(["Proxy", "Basic", "Auth", "Handler", "HTTP", "Password", "Manager"]) for _ in range(4))
        return v, f'__all__ = ["{v}Token", "{v}"]'
    if kind == 12:
        return "KEY_SIZE = 2048", "KEY_SIZE = 2048"
    if kind == 14:
        v = rng.choice(["postgres://user:password@localhost/db", "redis://:${REDIS_PASSWORD}@cache:6379",
                        "https://{user}:{password}@host/path", "ftp://anonymous:****@ftp.example.org"])
        return v, f'URL = "{v}"'
    if kind == 15:
        return '"Bearer " + token', 'headers["Authorization"] = "Bearer " + token'
    if kind == 16:
        return "token_type: access_token_for_service_account", "  token_type: access_token_for_service_account"
    return "git@github.com:org/repo.git", 'REMOTE = "git@github.com:org/repo.git"'


POSITIVE_KINDS = ["email", "email", "email", "ipv4", "ipv4", "ipv6", "aws", "aws_secret", "github", "github_pat",
                  "slack", "stripe", "private_key", "jwt", "bearer", "url_password", "entropy", "entropy", "entropy"]


def clean_base_files(paths: list[Path]) -> list[str]:
    """Real code with no address-like text at all (so every prediction in it is a false positive)."""
    out = []
    for p in paths:
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # a few stdlib test fixtures are deliberately not UTF-8
            continue
        if not (_LOOSE_EMAIL.search(text) or _LOOSE_IPV4.search(text) or _LOOSE_IPV6.search(text)):
            out.append(text)
    return out


def build_labelled_set(base_texts: list[str], n_docs: int, seed: int, positives_per_doc: int = 4,
                       negatives_per_doc: int = 4, clean_frac: float = 0.25, keep_ips: list[str] = ()) -> list[Sample]:
    """``n_docs`` samples; ``clean_frac`` of them are real code with nothing planted but hard negatives."""
    rng = random.Random(seed)
    keep = set(keep_ips)
    samples = []
    for i in range(n_docs):
        lines = rng.choice(base_texts).split("\n")
        sample = Sample("")
        inserts: list[str] = []
        if rng.random() >= clean_frac:
            for _ in range(positives_per_doc):
                typ, value, code = _positive(rng.choice(POSITIVE_KINDS), rng, keep)
                sample.planted.append((typ, value))
                inserts.append(code)
        for _ in range(negatives_per_doc):
            value, code = _negative(rng)
            sample.negatives.append(value)
            inserts.append(code)
        for code in inserts:
            lines.insert(rng.randint(0, len(lines)), code)
        sample.text = "\n".join(lines)
        samples.append(sample)
    return samples


@dataclass
class Score:
    tp: int = 0
    fn: int = 0
    predicted: int = 0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def precision(self) -> float:
        return min(self.tp, self.predicted) / self.predicted if self.predicted else 1.0


def score(samples: list[Sample], cfg: PIIConfig) -> tuple[dict[str, Score], list[str]]:
    """Per-type scores, and the hard negatives that were (wrongly) changed."""
    scores = {t: Score() for t in TYPES}
    broken_negatives = []
    for s in samples:
        red = redact_pii(s.text, cfg)
        for typ, value in s.planted:
            if value in red.text:
                scores[typ].fn += 1
            else:
                scores[typ].tp += 1
        for t in TYPES:
            scores[t].predicted += red.counts[t]
        broken_negatives += [v for v in s.negatives if v not in red.text]
    return scores, broken_negatives
