"""PII redaction: emails, public IP addresses and secret keys become `<EMAIL>`, `<IP_ADDRESS>`, `<KEY>`.

Detection is regex + validation, in the spirit of BigCode's StarCoder PII pipeline, but with the
validation done by libraries that already know the rules:

- provider token formats (AWS, GitHub, GitLab, Slack, Twilio, SendGrid, PyPI) use detect-secrets' own
  plugin regexes; where detect-secrets has none or an older format (Stripe test keys, Google API, OpenAI
  project keys, npm, Heroku, Mailgun, Hugging Face, Azure storage keys) the regex follows gitleaks' rule;
  the entropy of candidate secrets is detect-secrets' Shannon entropy;
- whether an IP address is public is decided by the stdlib ``ipaddress`` module (``is_global``), which
  knows private, loopback, link-local, CGNAT, documentation and reserved ranges for IPv4 and IPv6;
- whether an address's top-level domain exists is IANA's list as shipped by ``validators``.

What is written by hand is only what no library does: finding the *spans* to replace in source code
(detect-secrets reports values per line, not positions, and flags only the first line of a private key
block), finding the name a value is assigned to in the many syntaxes code and config use, and the
code-specific false-positive filters (placeholders, environment-variable names, version strings,
hashes, UUIDs, inlined images, matrix products). benchmarks/pii_labelled.py measures all of it.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import math
import re
import string
from dataclasses import dataclass, field

import validators
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString, HexHighEntropyString
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

from pipeline.config import PIIConfig
from pipeline.data.records import line_stats
from pipeline.data.steps.base import Transform

PLACEHOLDERS = {"email": "<EMAIL>", "ip_address": "<IP_ADDRESS>", "key": "<KEY>"}

# ------------------------------------------------------------------------------------------ emails
# A deliberately conservative address: dotted domain ending in a 2+ letter TLD. find_emails checks the
# character before it, so that the local part is whole (no "user" cut out of "a.user") and URL userinfo
# ("://u:p@host") is not taken for an address.
EMAIL_RE = re.compile(
    r"([A-Za-z0-9](?:[A-Za-z0-9._%+\-]{0,63}[A-Za-z0-9_%+\-])?)"
    r"@((?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+([A-Za-z]{2,24}))"
    r"(?![\w\-@]|\.[A-Za-z0-9]|:[\w~/])"  # not "git@github.com:org/repo" (an scp-style git remote)
)
# The regex above is only tried where an "@" + domain is (a literal-led scan, ~50x faster than letting
# the engine try every position); the local part is then the run of address characters before the "@".
AT_DOMAIN_RE = re.compile(r"@(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}")
LOCAL_RUN_RE = re.compile(r"[A-Za-z0-9._%+\-]{1,64}$")
# What may not stand right before an address (the local part would be cut, or it is URL userinfo
# "scheme://user:pass@host"); ":" is fine after "mailto".
NOT_BEFORE_EMAIL = frozenset(string.ascii_letters + string.digits + "_.%+-/:@")
# "x@self.data" is a matrix product on an attribute (an address at a "self." domain is rarer than that).
CODE_RECEIVERS = frozenset({"self", "cls", "this"})
# "icon@2x.png", "lodash@file.js": asset and package specs that look like addresses.
FILE_TLDS = frozenset(
    "png jpg jpeg gif svg webp ico bmp js mjs cjs ts tsx jsx py pyc css scss less html htm json yaml yml md "
    "txt xml toml lock map wasm so dll exe sh rb go rs java kt c h cc cpp hpp o a gz zip tar".split()
)

# --------------------------------------------------------------------------------------------- IPs
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not inside a longer dotted number (OIDs, 5-part versions) nor glued to identifiers ("v1.2.3.4").
IPV4_RE = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\w]|\.\d|\.in-addr)")
# Fast literal-led scans that find where the two regexes around them are worth trying.
IPV4_CANDIDATE_RE = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
IPV6_CANDIDATE_RE = re.compile(r":[0-9A-Fa-f]{0,4}:")
HEX_RUN_RE = re.compile(r"[0-9A-Fa-f]{1,4}$")
# Candidates only; ipaddress.IPv6Address does the real validation.
IPV6_RE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{1,4}:|:)(?::|[0-9A-Fa-f]{1,4}:){1,7}(?::|[0-9A-Fa-f]{1,4})"
                     r"(?:\.\d{1,3}){0,3}(?![\w:])")
# "version = '1.2.3.4'", "__version__", "Version: 10.0.0.1", "pkg==1.2.3.4" are versions, not hosts;
# "section 7.3.2.2", "IEEE 802.11 8.4.2.29", "RFC 4960 5.3.1.1" are numbered sections of specifications.
NOT_IP_BEFORE_RE = re.compile(
    r"(?i)(?:version|\bver\b|release|requires|build|[=<>~!]=|[<>^~]|\bv"
    r"|section|\bsect?\.|§|chapter|clause|table|figure|\bfig\.|\bspec(?:ification)?|ieee|\brfc\s*\d+|\b802\.\d+\S*"
    r"|\bstd\.?|standard|\bdraft\S*|\bstep)_*\W{0,6}$"
    r"|(?:^|[^a-z])oids?(?:[^a-z]|$)"  # ASN.1 object ids anywhere before: "EXTENSION_OID_KEY_USAGE = '2.5.29.15'"
)
# A section number opening a heading: "/* 4.3.2.1 Class-Specific AC Interface Descriptor */", "5.2.1.1. Append".
SECTION_TITLE_AFTER_RE = re.compile(r"\.?[ \t]+[A-Z]")
IP_PORT_AFTER_RE = re.compile(r"[:/]\d")  # 1.2.3.4:8080, 1.2.3.4/24
IP_WORD_BEFORE_RE = re.compile(r"(?i)ip|host|addr|server|connect|dns|proxy|gateway|route|ping|bind|listen|://|@")
# A bare number in a comment or in parentheses refers to a spec step: "// 5.2.1.1", "/* 8.4.26.1 */", "(5.4.1.1)".
COMMENT_BEFORE_RE = re.compile(r"(?://+|#+|/\*+|^[ \t]*\*+|\()[ \t]*$", re.M)
COMMENT_AFTER_RE = re.compile(r"[ \t]*\)|[ \t]*(?:\*/)?[ \t]*(?:\r?\n|$)")

# -------------------------------------------------------------------------------------------- keys
# Provider token formats: detect-secrets' plugin regexes where they match the provider's current format,
# gitleaks' rule shapes (cmd/generate/config/rules) where detect-secrets has none or an older one.
# Each rule is (literals one of which must occur in the text, regex); a group named "v" is the part to replace
# (the whole match otherwise). A match glued to a longer base64/identifier run is not a token.
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_GITLAB = ("glpat-", "gldt-", "glft-", "glsoat-", "glrt-", "glcbt-", "glimt-", "glptt-", "glagent-", "gloas-", "GR1348941")
TOKEN_RULES: list[tuple[tuple[str, ...], re.Pattern]] = [
    (("AKIA", "ASIA", "ABIA", "ACCA", "A3T"), AWSKeyDetector.denylist[0]),
    *((("ghp_", "gho_", "ghu_", "ghs_", "ghr_"), rx) for rx in GitHubTokenDetector.denylist),
    (("github_pat_",), re.compile(r"github_pat_[A-Za-z0-9_]{22,255}")),  # fine-grained, newer than detect-secrets
    *((_GITLAB, rx) for rx in GitLabTokenDetector.denylist),
    *((("xox", "XOX") if "xox" in rx.pattern else ("hooks.slack.com",), rx) for rx in SlackDetector.denylist),
    (("k_live_", "k_test_", "k_prod_"), re.compile(r"(?:sk|rk)_(?:live|test|prod)_[A-Za-z0-9]{10,99}")),  # gitleaks
    (("SK",), TwilioKeyDetector.denylist[1]), (("AC",), TwilioKeyDetector.denylist[0]),
    (("AccountKey=",), re.compile(r"AccountKey=(?P<v>[A-Za-z0-9+/]{86}==)")),  # detect-secrets' shape, value only
    (("SharedAccessKey=",), re.compile(r"SharedAccessKey=(?P<v>[A-Za-z0-9+/]{43}=)")),
    (("AIza",), re.compile(r"AIza[\w\-]{35}")),
    (("T3BlbkFJ",), re.compile(r"sk-(?:(?:proj|svcacct|admin)-)?[A-Za-z0-9_\-]{20,74}T3BlbkFJ[A-Za-z0-9_\-]{20,74}")),
    (("npm_",), re.compile(r"npm_[A-Za-z0-9]{36}")),
    (("_authToken",), re.compile(rf"/:_authToken=[ \t]*(?P<v>npm_[A-Za-z0-9]{{36}}|{_UUID}|[A-Za-z0-9+/=_\-]{{20,}})")),
    *((("SG.",), rx) for rx in SendGridDetector.denylist),
    (("HRKU-",), re.compile(r"HRKU-AA[0-9A-Za-z_\-]{58}")),
    (("key-",), re.compile(r"key-[0-9a-f]{32}")),  # Mailgun
    (("hf_",), re.compile(r"hf_[A-Za-z]{34}")),  # Hugging Face
    *((("pypi-",), rx) for rx in PypiTokenDetector.denylist),
]
TOKEN_BEFORE = re.compile(r"[A-Za-z0-9+/_\-]")
# Documentation values and placeholders in a token's shape: "AKIAIOSFODNN7EXAMPLE", "ghp_XXXX...", "npm_000...".
PLACEHOLDER_RE = re.compile(
    r"(?i)(.)\1{5}|example|your|placeholder|replace|insert|changeme|dummy|sample|redacted|todo"
    r"|^\$\{.*\}$|^\$[A-Z_]+$|%\(\w+\)s|\{\{.*\}\}|^\{\w*\}$|^<[^<>]*>$|\*{3}"
)
# JSON Web Tokens: header.payload.signature, validated with detect-secrets' JWT plugin (base64 JSON parts).
JWT_RE = re.compile(r"eyJ[A-Za-z0-9_\-]+\.eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
# "Authorization: Bearer <token>" and credentials inside URLs ("postgres://app:S3cr3t@db/x", "redis://:pw@h").
BEARER_RE = re.compile(r"(?i)\bbearer\s+([A-Za-z0-9\-._~+/]{16,}=*)")
URL_PASSWORD_RE = re.compile(r"(?i)\b[a-z][a-z0-9+.\-]{1,15}://[^\s:/@'\"]{0,64}:([^\s@/'\"]{6,128})@")
PRIVATE_KEY_RE = re.compile(
    r"-----BEGIN ((?:[A-Z0-9]+ )*)PRIVATE KEY(?: BLOCK)?-----"
    r"(?:[\s\S]{0,20000}?-----END \1PRIVATE KEY(?: BLOCK)?-----|[A-Za-z0-9+/=\s\\n:\-,#]*)"
)
# A value assigned to a secret-ish name: `api_key = "..."`, `"password": '...'`, `token: "..."`,
# `var apiToken string = "..."`, `$key .= "..."`, `AWS_SECRET=...` (env style), `?api_key=...&`,
# `x-api-key: ...` (a header), `<apiKey>...</apiKey>`, `--api-key ...` (a CLI flag).
SECRET_NAME = r"(?:[A-Za-z_$][\w$.\-]{0,40}?)?(?:key|secret|token|passw|pwd|pass\b|credential|auth)[\w$.\-]{0,40}"
# An optional type between name and separator (`apiKey: str =`, `var apiKey string =`) and the separator.
_NAME_TAIL = r"['\"]?\]?(?:[ \t]*:[ \t]*[A-Za-z_][\w.\[\]]*[ \t]*(?==)|[ \t]+[A-Za-z_][\w.\[\]]*[ \t]*(?==))?[ \t]*"
QUOTED_VALUE_RE = re.compile(r"(['\"`])([^\s'\"`\\]{8,})\1")
NAME_BEFORE_QUOTE_RE = re.compile(
    rf"(?i)(?<![\w$.\-])(?P<name>{SECRET_NAME}){_NAME_TAIL}(?:[.+?:]{{0,2}}=>?|:|,|\()\s*[rbuf]{{0,2}}$"
)
# Unquoted: after "=" or ":" up to the end of the line, a quote, "&", ";" or an escaped newline.
# "&" ends a value only before another query parameter ("?token=...&page=2"), and "=" ends one
# (base64 padding aside), so "https://h/v1?api_key=..." is not taken for one value.
UNQUOTED_VALUE_RE = re.compile(
    r"[=:][ \t]*((?:[^\s'\"`<>;&,\\=]|&(?![\w.\-]+=)){8,}={0,2})(?=[\s'\"`<;&,]|\\[nrt]|$)"
)
NAME_BEFORE_UNQUOTED_RE = re.compile(rf"(?i)(?<![\w$.\-])(?P<name>{SECRET_NAME}){_NAME_TAIL}(?:[.+?:]{{0,2}})$")
XML_VALUE_RE = re.compile(r"<(?P<name>[\w.\-]{1,60})>[ \t]*\r?\n?[ \t]*(?P<v>[^\s<>]{8,512})\s*</(?P=name)>")
CLI_FLAG_RE = re.compile(r"--(?P<name>[\w\-]{2,60})[ \t=]+(['\"]?)(?P<v>[^\s'\"]{8,512})\2(?![^\s'\"])")
MYSQL_PASSWORD_RE = re.compile(r"(?<=\s)-p(['\"])(?P<v>[^\s'\"]{6,128})\1")
HASH_NAME_RE = re.compile(
    r"(?i)hash|sha\d*|md5|digest|checksum|cksum|crc|etag|commit|rev|integrity|fingerprint|cache|uuid|guid"
)
HASH_HEX_LENGTHS = frozenset({32, 40, 56, 64, 96, 128})
UUID_RE = re.compile(rf"^{_UUID}$|^[0-9a-fA-F]{{12}}[1-5][0-9a-fA-F]{{3}}[89abAB][0-9a-fA-F]{{15}}$")  # also uuid.hex
# An environment-variable / constant name used as a value: `os.environ.get("STRIPE_SECRET_KEY_V2")`.
CONSTANT_NAME_RE = re.compile(r"[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+")
LOWER_WORD_RE = re.compile(r"[a-z_$][a-z0-9_$]*")
HOST_PORT_RE = re.compile(r"[\w.\-]+:\d{1,5}")
# Words of an identifier: "HTTPPasswordMgr" -> HTTP, Password, Mgr; a random string splits into 1-2 char bits.
WORD_RE = re.compile(r"[A-Z]{2,}(?=[A-Z][a-z]|[^A-Za-z]|$)|[A-Z]?[a-z]+|[A-Z]")
TOKEN_CHARS = frozenset(string.ascii_letters + string.digits + "+/=_-~")
# Base64 of a binary file is data, not a key: the decoded start is a file signature. (A signature table
# is all the sniffing this needs; no file-type library is installed.)
FILE_SIGNATURES = (b"\x89PNG", b"GIF8", b"\xff\xd8\xff", b"%PDF", b"\x1f\x8b", b"PK\x03\x04", b"RIFF", b"wOFF",
                   b"wOF2", b"OggS", b"\x00\x00\x01\x00", b"BM", b"<svg", b"<?xml", b"ID3", b"fLaC")

_B64 = Base64HighEntropyString()
_HEX = HexHighEntropyString()


@dataclass(frozen=True, order=True)
class Span:
    start: int
    end: int
    kind: str  # email | ip_address | key


@functools.lru_cache(maxsize=4096)
def iana_tld(tld: str) -> bool:
    """Is ``tld`` a top-level domain in IANA's list (validators ships it): "weight" in "x@w.weight" is not."""
    return validators.domain(f"example.{tld}", consider_tld=True) is True


def find_emails(text: str) -> list[Span]:
    if "@" not in text:
        return []
    out = []
    for at in AT_DOMAIN_RE.finditer(text):
        run = LOCAL_RUN_RE.search(text, max(0, at.start() - 64), at.start())
        m = EMAIL_RE.match(text, run.start()) if run else None
        tld = m.group(3) if m else ""
        if m is None or tld.lower() in FILE_TLDS or not (tld.islower() or tld.isupper()) or not iana_tld(tld.lower()):
            continue
        if m.group(2).split(".", 1)[0] in CODE_RECEIVERS:
            continue  # "x@self.data": a matrix product on an attribute, not an address
        before = text[m.start() - 1] if m.start() else " "
        mailto = before == ":" and text[max(0, m.start() - 7):m.start() - 1].lower() == "mailto"
        if before in NOT_BEFORE_EMAIL and not mailto:
            continue
        out.append(Span(m.start(), m.end(), "email"))
    return out


def _not_an_ip(text: str, start: int, end: int) -> bool:
    """A dotted quad that is a version or a section number, judged from its own line."""
    line_start = text.rfind("\n", 0, start) + 1
    if NOT_IP_BEFORE_RE.search(text, max(line_start, start - 40), start):
        return True
    if SECTION_TITLE_AFTER_RE.match(text, end):
        return True
    if COMMENT_BEFORE_RE.search(text, max(line_start, start - 8), start) and COMMENT_AFTER_RE.match(text, end):
        return True
    # Section and step numbers ("Client workflow 5.4.3.1:", "(43.4.2.2 in the 802.3ad standard)") have
    # small parts; a public address that small (~0.15% of them) is believed only in an address context.
    if all(int(p) < 50 for p in text[start:end].split(".")):
        return not _address_context(text, line_start, start, end)
    return False


def _address_context(text: str, line_start: int, start: int, end: int) -> bool:
    before = text[start - 1] if start else ""
    if before in "'\"`" and text[end:end + 1] == before:
        return True  # a string literal holding just the address
    return bool(IP_PORT_AFTER_RE.match(text, end) or IP_WORD_BEFORE_RE.search(text, max(line_start, start - 40), start))


def find_ips(text: str, keep: frozenset[str]) -> list[Span]:
    out = []
    for cand in IPV4_CANDIDATE_RE.finditer(text):
        m = IPV4_RE.match(text, cand.start())
        if m is None:
            continue
        addr = ipaddress.IPv4Address(m.group())
        if (addr.is_global and not addr.is_multicast and m.group() not in keep
                and not _not_an_ip(text, m.start(), m.end())):
            out.append(Span(m.start(), m.end(), "ip_address"))
    last_end = -1
    for cand in IPV6_CANDIDATE_RE.finditer(text):
        if cand.start() < last_end:
            continue
        m = _ipv6_at(text, cand.start())
        if m is None:
            continue
        last_end = m.end()
        try:
            addr6 = ipaddress.IPv6Address(m.group())
        except ValueError:
            continue
        # Only 2000::/3 is allocated global unicast; this also rules out C++-ish "abc::def".
        if addr6.is_global and (addr6.packed[0] >> 5) == 1 and str(addr6) not in keep:
            out.append(Span(m.start(), m.end(), "ip_address"))
    return out


def _ipv6_at(text: str, colon: int):
    """The IPv6 candidate around a ':x:' hit: it starts at the hex group before the colon, or at the colon."""
    back = HEX_RUN_RE.search(text, max(0, colon - 4), colon)
    if back:
        m = IPV6_RE.match(text, back.start())
        if m:
            return m
    return IPV6_RE.match(text, colon)


def shannon_entropy(value: str) -> float:
    """detect-secrets' entropy, over the hex charset for hex strings and base64's otherwise."""
    return (_HEX if all(c in string.hexdigits for c in value) else _B64).calculate_shannon_entropy(value)


def _has_ascending_run(value: str, n: int = 6) -> bool:
    run = 1
    for a, b in zip(value, value[1:]):
        run = run + 1 if ord(b) == ord(a) + 1 else 1
        if run >= n:
            return True
    return False


def _identifier_like(value: str) -> bool:
    """``ProxyBasicAuthHandler``, ``service_api_key_v2``: words of 4+ letters on average, few digits."""
    if sum(c.isdigit() for c in value) > 2:
        return False
    words = WORD_RE.findall(value)
    return bool(words) and sum(map(len, words)) / len(words) >= 4.0


def _file_data(value: str) -> bool:
    """Base64 whose decoded start is a file signature (an inlined PNG, font, gzip...)."""
    try:
        head = base64.b64decode(value[:24] + "=" * (-len(value[:24]) % 4))
    except ValueError:
        return False
    return head.startswith(FILE_SIGNATURES)


def _placeholder(value: str) -> bool:
    return bool(PLACEHOLDER_RE.search(value))


def looks_like_secret(name: str, value: str, cfg: PIIConfig) -> bool:
    """Is ``value`` (assigned to ``name``) a random secret rather than a hash, UUID, blob or word?"""
    if not (cfg.min_key_length <= len(value) <= cfg.max_key_length):
        return False  # short: words and placeholders; very long: base64 data blobs (images, fonts)
    if UUID_RE.match(value):
        return "heroku" in name.lower()  # Heroku's legacy API key is a UUID; gitleaks flags it only by name
    is_hex = all(c in string.hexdigits for c in value)
    if is_hex and len(value) in HASH_HEX_LENGTHS and HASH_NAME_RE.search(name):
        return False  # an md5/sha digest in a hash-ish context
    if _placeholder(value) or CONSTANT_NAME_RE.fullmatch(value) or _identifier_like(value):
        return False  # YOUR_API_KEY_HERE, SERVICE_API_KEY (an env var's name), ProxyBasicAuthHandler
    if _has_ascending_run(value) or _file_data(value):
        return False  # alphabets ("ABCDEFGHIJ...", "0123456789..."); inlined images
    if is_hex:
        return shannon_entropy(value) > cfg.min_key_entropy_hex
    # A random string of length n cannot exceed log2(n) bits/char, so short keys get a length-scaled bar.
    limit = min(cfg.min_key_entropy_base64, cfg.key_entropy_len_factor * math.log2(len(value)))
    return shannon_entropy(value) > limit


def looks_like_password(value: str, cfg: PIIConfig) -> bool:
    """A value under a password-ish name: 3 of lower/upper/digit/symbol, and not a placeholder or code."""
    if not (cfg.min_password_length <= len(value) <= 128) or _placeholder(value) or UUID_RE.match(value):
        return False
    if any(c in value for c in "()[]") or value.startswith(("/", "./", "~/")) or HOST_PORT_RE.fullmatch(value):
        return False  # code (`getpass.getpass()`), a path, "localhost:22"
    if all(LOWER_WORD_RE.fullmatch(part) or CONSTANT_NAME_RE.fullmatch(part) or (part.isidentifier() and _identifier_like(part))
           for part in value.split(".")):
        return False  # `DB_PASSWORD`, `self.conf.db_password`, `process.env.TWILIO_API_KEY_2024`
    classes = (any(c.islower() for c in value) + any(c.isupper() for c in value) + any(c.isdigit() for c in value)
               + any(not c.isalnum() for c in value))
    return classes >= 3 or (classes == 2 and len(value) >= 12)


def _real_password(value: str) -> bool:
    """A URL password that is not a placeholder ("password", "{pw}", "${DB_PASS}", "****", "<secret>")."""
    if any(c in value for c in "{}$<>%*[]()"):
        return False
    # "password", "changeme", "guest", "my_pass": lowercase words are placeholders and defaults.
    return not re.fullmatch(r"[a-z_\-]+", value)


SECRET_WORDS = ("key", "secret", "token", "passw", "pwd", "credential", "auth")
# A cheap test before the name regex: most assignments in code name no secret at all.
NAME_WORD_RE = re.compile(r"(?i)key|secret|token|pass|pwd|credential|auth")
PASSWORD_NAME_RE = re.compile(r"(?i)passw|pwd|(?:^|[_\-.])pass(?:$|[_\-.])|^pw$|Pass(?:$|[A-Z_])")


def secret_name(name: str) -> bool:
    """``apiKey``, ``DB_PASSWORD``, ``x-api-key``, ``APIKEY``: a keyword starts one of the name's words.

    This only has to keep out random-looking names (map keys in JSON data that contain "key" or "auth" by
    chance); words like "keyboard" or "author" pass and are then judged by their value.
    """
    if sum(c.isdigit() for c in name) > 2:
        return False
    low = name.lower()
    if (name.islower() or name.isupper()) and not any(c in name for c in "_-.$"):
        return any(w in low for w in SECRET_WORDS)  # one-case run-together names: "apikey", "PASSWD"
    words = [w.lower() for w in WORD_RE.findall(name)]
    return any(w.startswith(SECRET_WORDS) or w == "pass" for w in words)


def secret_value(name: str, value: str, cfg: PIIConfig) -> bool:
    """Is ``value``, assigned to ``name``, a secret: a random token, or a password under a password name?"""
    if not secret_name(name):
        return False
    if all(c in TOKEN_CHARS for c in value) and looks_like_secret(name, value, cfg):
        return True
    return bool(PASSWORD_NAME_RE.search(name)) and looks_like_password(value, cfg)


def _line_start(text: str, pos: int) -> int:
    return max(text.rfind("\n", max(0, pos - 120), pos) + 1, pos - 120)


def _glued(text: str, m: re.Match, prefixed: bool) -> bool:
    """A token-shaped match inside a longer base64 / identifier run (one led by a literal like "AccountKey="
    is not); a "/" before it is a path or URL separator unless a base64 run goes on after it."""
    after = text[m.end()] if m.end() < len(text) else " "
    if after.isalnum():
        return True
    if prefixed or not m.start():
        return False
    before = text[m.start() - 1]
    if before == "/":
        return after in "+="  # ".../Accounts/AC.../Messages.json" is a path
    return bool(TOKEN_BEFORE.match(before))


def _named_values(text: str, cfg: PIIConfig) -> list[Span]:
    """Values assigned to a secret-ish name.

    The value is found first (a quoted run, or an unquoted one after "=" / ":"), then the name before it on
    its line: scanning for the names first costs much more, the keywords ("key", "pass") being common
    words in code. A cheap keyword test comes before the name regex, most assignments naming no secret.
    """
    out: list[Span] = []
    shortest = min(cfg.min_key_length, cfg.min_password_length)
    for rx, name_rx, g in ((QUOTED_VALUE_RE, NAME_BEFORE_QUOTE_RE, 2), (UNQUOTED_VALUE_RE, NAME_BEFORE_UNQUOTED_RE, 1)):
        for m in rx.finditer(text):
            if len(m.group(g)) < shortest:
                continue
            start = _line_start(text, m.start())
            if not NAME_WORD_RE.search(text, start, m.start()):
                continue
            name = name_rx.search(text, start, m.start())
            if name and secret_value(name.group("name"), m.group(g), cfg):
                out.append(Span(m.start(g), m.end(g), "key"))
    return out


def find_keys(text: str, cfg: PIIConfig) -> list[Span]:
    out = []
    for hints, rx in TOKEN_RULES:
        if not any(h in text for h in hints):
            continue
        for m in rx.finditer(text):
            s, e = m.span("v") if "v" in rx.groupindex else m.span()
            if _glued(text, m, "v" in rx.groupindex) or _placeholder(text[s:e]):
                continue
            out.append(Span(s, e, "key"))
    if "eyJ" in text:
        out.extend(Span(m.start(), m.end(), "key") for m in JWT_RE.finditer(text)
                   if JwtTokenDetector.is_formally_valid(m.group()))
    if "earer" in text or "EARER" in text:
        for m in BEARER_RE.finditer(text):
            if looks_like_secret("bearer", m.group(1), cfg):
                out.append(Span(m.start(1), m.end(1), "key"))
    if "://" in text:
        for m in URL_PASSWORD_RE.finditer(text):
            if _real_password(m.group(1)):
                out.append(Span(m.start(1), m.end(1), "key"))
    if "PRIVATE KEY" in text:
        out.extend(Span(m.start(), m.end(), "key") for m in PRIVATE_KEY_RE.finditer(text))
    out += _named_values(text, cfg)
    if "</" in text:
        for m in XML_VALUE_RE.finditer(text):
            if secret_value(m.group("name"), m.group("v"), cfg):
                out.append(Span(m.start("v"), m.end("v"), "key"))
    if "--" in text:
        for m in CLI_FLAG_RE.finditer(text):
            if m.start() and (text[m.start() - 1].isalnum() or text[m.start() - 1] in "_-"):
                continue
            if secret_value(m.group("name"), m.group("v"), cfg):
                out.append(Span(m.start("v"), m.end("v"), "key"))
    if " -p" in text:
        for m in MYSQL_PASSWORD_RE.finditer(text):
            if looks_like_password(m.group("v"), cfg):
                out.append(Span(m.start("v"), m.end("v"), "key"))
    return out


def resolve_overlaps(spans: list[Span]) -> list[Span]:
    """Keep non-overlapping spans: earliest start first, the longer one on ties (a key block wins)."""
    kept: list[Span] = []
    for s in sorted(spans, key=lambda s: (s.start, -(s.end - s.start))):
        if kept and s.start < kept[-1].end:
            continue
        kept.append(s)
    return kept


@dataclass
class Redaction:
    text: str
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in PLACEHOLDERS})


def redact_pii(text: str, cfg: PIIConfig) -> Redaction:
    spans: list[Span] = []
    if cfg.enabled:
        if cfg.keys:
            spans += find_keys(text, cfg)
        if cfg.emails:
            spans += find_emails(text)
        if cfg.ip_addresses:
            spans += find_ips(text, frozenset(cfg.keep_ips))
    result = Redaction(text)
    if not spans:
        return result
    parts, pos = [], 0
    for s in resolve_overlaps(spans):
        parts.append(text[pos:s.start])
        parts.append(PLACEHOLDERS[s.kind])
        result.counts[s.kind] += 1
        pos = s.end
    parts.append(text[pos:])
    result.text = "".join(parts)
    return result


class RedactPII(Transform):
    """Replace PII with placeholders and record per-document counts in ``pii_redactions``.

    The ``id`` stays the one of the raw file (traceability back to the source); line statistics are
    recomputed because the content changed.
    """

    name = "pii_redaction"

    def __init__(self, cfg: PIIConfig):
        self.cfg = cfg

    def transform(self, doc: dict) -> dict:
        red = redact_pii(doc["content"], self.cfg)
        out = dict(doc, pii_redactions=red.counts)
        if red.text != doc["content"]:
            out["content"] = red.text
            out["size_bytes"] = len(red.text.encode("utf-8"))
            out.update(line_stats(red.text))
        return out
