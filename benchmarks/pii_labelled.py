"""A labelled PII set built from real code, for precision / recall of the redaction step.

This is a measuring tool, not a pipeline step, so it lives beside the benchmark that reports it
(benchmarks/bench_pii.py) and not in the installed ``pipeline`` package; tests import it from here.

Real standard-library files (chosen because a loose scan finds no address-like text in them) get PII
planted at random line boundaries, in the contexts where code really holds it. The secret families and
their shapes follow published secret-scanner rule sets — gitleaks' rules (cmd/generate/config/rules),
detect-secrets' plugins and GitHub's secret-scanning patterns — and the contexts follow the ones gitleaks
validates every rule in (INI, JSON, YAML, XML, env files, Python/Go/Java/JS/C# assignments, CLI flags).
The values are drawn at random from each rule's shape; nothing is hand-picked.

Files also get *look-alikes* planted: text a secret or address scanner is known to take for PII
(placeholders, environment-variable names, unspecified/netmask/documentation addresses, versions,
matrix products, checksums, UUIDs, base64 images, commit hashes, ...), each in the same kinds of
context, which must come out untouched.

The stdlib files are split in two fixed slices by a hash of their path: ``tune`` (what the detector was
tuned on, with seed 0) and ``holdout`` (a different seed and files never looked at while tuning).
Everything is seeded, so a figure can be reproduced exactly.

Scoring: a planted value is found when it no longer occurs in the redacted text; the redactor's own
per-type counts give the predictions, so anything redacted that was not planted (in the real code or
a look-alike) lowers precision.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import random
import re
import string
import struct
import sysconfig
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PIIConfig
from pipeline.data.steps.pii import redact_pii

TYPES = ("email", "ip_address", "key")
SLICES = ("tune", "holdout")
_LOOSE_EMAIL = re.compile(r"[\w.+-]@[\w-]+\.[\w.]+")
_LOOSE_IPV4 = re.compile(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}")
_LOOSE_IPV6 = re.compile(r"\b[0-9A-Fa-f]{1,4}:[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}\b")

FIRST = ["anna", "bob", "chen", "dmitri", "elena", "farah", "giulia", "hiro", "ines", "jonas", "kwame", "lea",
         "maria", "nils", "olga", "pedro", "quinn", "ravi", "sofia", "tomas", "uma", "viktor", "wei", "yusuf"]
LAST = ["smith", "garcia", "mueller", "rossi", "tanaka", "nguyen", "kowalski", "okafor", "silva", "dubois",
        "jensen", "novak", "kim", "patel", "ivanova", "haddad"]
DOMAINS = ["gmail.com", "example-corp.com", "mail.acme.io", "uni-heidelberg.de", "cs.stanford.edu",
           "posteo.net", "company.co.uk", "startup.ai", "python.org", "fastmail.fm", "dev.internal-tools.org"]
UPPER, LOWER, DIGITS = string.ascii_uppercase, string.ascii_lowercase, string.digits
B64 = string.ascii_letters + DIGITS + "+/"
ALNUM = string.ascii_letters + DIGITS
URLSAFE = ALNUM + "_-"
HEX = "0123456789abcdef"
PUNCT = "!@#$%^&*._-+?"


@dataclass
class Sample:
    text: str
    planted: list[tuple[str, str, str]] = field(default_factory=list)  # (type, family, value that must go)
    negatives: list[tuple[str, str]] = field(default_factory=list)  # (look-alike kind, value that must stay)


def _rand(rng: random.Random, chars: str, n: int) -> str:
    return "".join(rng.choice(chars) for _ in range(n))


# --------------------------------------------------------------------------------- contexts
# The shapes gitleaks checks each rule against (its GenerateSampleSecrets), plus CLI flags and comments;
# {n} is a variable name, {N} the same as an environment variable, {v} the value.
CONTEXTS = [
    '{n} = "{v}"', "{n} = '{v}'", "{n}={v}", "{n} = {v}", '{{\n    "{n}": "{v}"\n}}', '    "{n}": "{v}",',
    "{n}: {v}", "{n}: '{v}'", '{n}: "{v}"', "<{n}>\n    {v}\n</{n}>", "<{n}>{v}</{n}>", 'string {n} = "{v}";',
    'var {n} string = "{v}"', '{n} := "{v}"', "{n} := `{v}`", 'String {n} = "{v}";', 'var {n} = "{v}"',
    '${n} .= "{v}"', "const {n} = '{v}';", "export {N}={v}", '{N}="{v}"', 'System.setProperty("{N}", "{v}")',
    '  "{n}" => "{v}"', 'os.environ.setdefault("{N}", "{v}")', 'config["{n}"] = "{v}"', "  {n}: {v}",
    '{{"config.ini": "{N}={v}\\nBACKUP_ENABLED=true"}}', "settings.{n} = '{v}'", "--{flag}={v}", "--{flag} {v}",
]


def _case(name: str, style: str) -> str:
    words = re.findall(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|\d+", name)
    if style == "snake":
        return "_".join(w.lower() for w in words)
    if style == "camel":
        return words[0].lower() + "".join(w.title() for w in words[1:])
    return "_".join(w.upper() for w in words)


def _in_context(rng: random.Random, names: list[str], value: str, extra: list[str] = ()) -> str:
    """A line (or few) of code/config assigning ``value`` to one of ``names`` (or one of ``extra``)."""
    base = rng.choice(names)
    templates = CONTEXTS + list(extra) * 4  # provider-specific contexts about as often as all generic ones
    t = rng.choice(templates)
    n = _case(base, rng.choice(["snake", "camel", "upper"]))
    return t.format(n=n, N=_case(base, "upper"), v=value, flag=_case(base, "snake").replace("_", "-"))


def _png_base64(rng: random.Random, n_bytes: int) -> str:
    """A real PNG (signature + IHDR + IDAT of random pixels), base64-encoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    w = max(1, n_bytes // 12)
    raw = b"".join(b"\x00" + rng.randbytes(3 * w) for _ in range(4))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, 4, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


# ---------------------------------------------------------------------------- secret families
# Each returns (value that must disappear, code holding it). Shapes from the rule sets named above.
def _aws_access_key_id(rng):
    v = rng.choice(["AKIA", "ASIA", "AKIA", "ABIA"]) + _rand(rng, UPPER + "234567", 16)
    return v, _in_context(rng, ["aws_access_key_id", "access_key_id", "AWS_ACCESS_KEY"], v,
                          ["aws configure set aws_access_key_id {v}", "    key_id='{v}',",
                           "boto3.client('s3', aws_access_key_id='{v}', aws_secret_access_key=secret)"])


def _aws_secret_access_key(rng):
    v = _rand(rng, B64, 40)
    return v, _in_context(rng, ["aws_secret_access_key", "aws_secret_key", "secret_access_key"], v,
                          ["boto3.client('s3', aws_access_key_id=key_id, aws_secret_access_key='{v}')"])


def _github(rng):
    if rng.random() < 0.3:
        v = "github_pat_" + _rand(rng, ALNUM, 22) + "_" + _rand(rng, ALNUM, 59)
    else:
        v = rng.choice(["ghp_", "gho_", "ghu_", "ghs_", "ghr_"]) + _rand(rng, ALNUM, 36)
    return v, _in_context(rng, ["github_token", "gh_token", "GITHUB_PAT", "access_token"], v,
                          ['headers = {{"Authorization": "token {v}"}}', "# old token: {v}", 'gh = Github("{v}")',
                           "git clone https://{v}@github.com/org/repo.git"])


def _gitlab(rng):
    prefix = rng.choice(["glpat-", "glpat-", "gldt-", "glrt-", "glptt-"])
    v = prefix + _rand(rng, URLSAFE, 40 if prefix == "glptt-" else 20)
    return v, _in_context(rng, ["gitlab_token", "private_token", "CI_JOB_TOKEN", "GL_TOKEN"], v,
                          ['gl = gitlab.Gitlab("https://gitlab.com", private_token="{v}")',
                           "curl --header 'PRIVATE-TOKEN: {v}' https://gitlab.com/api/v4/projects"])


def _slack(rng):
    if rng.random() < 0.25:
        v = f"T{_rand(rng, UPPER + DIGITS, 10)}/B{_rand(rng, UPPER + DIGITS, 10)}/{_rand(rng, ALNUM, 24)}"
        url = "https://hooks.slack.com/services/" + v
        return v, _in_context(rng, ["slack_webhook_url", "webhook", "SLACK_HOOK"], url,
                              ['requests.post("{v}", json={{"text": msg}})'])
    v = (f"xox{rng.choice('bpar')}-{rng.randint(10**9, 10**12)}-{rng.randint(10**9, 10**12)}-"
         f"{_rand(rng, ALNUM.lower(), 24)}")
    return v, _in_context(rng, ["slack_token", "slack_bot_token", "SLACK_API_TOKEN"], v,
                          ["client = WebClient(token='{v}')"])


def _stripe(rng):
    v = rng.choice(["sk_live_", "rk_live_", "sk_test_", "rk_test_"]) + _rand(rng, ALNUM, rng.choice([24, 34, 99]))
    return v, _in_context(rng, ["stripe_secret_key", "stripe_api_key", "STRIPE_KEY"], v,
                          ['stripe.api_key = "{v}"', "curl https://api.stripe.com/v1/charges -u {v}:"])


def _twilio_api_key(rng):
    v = "SK" + _rand(rng, HEX, 32)
    return v, _in_context(rng, ["twilio_api_key", "api_key_sid", "TWILIO_KEY"], v,
                          ['client = Client("{v}", api_secret, account_sid)', "# twilio key {v}"])


def _twilio_account_sid(rng):
    v = "AC" + _rand(rng, HEX, 32)
    return v, _in_context(rng, ["twilio_account_sid", "account_sid", "TWILIO_SID"], v,
                          ['client = Client("{v}", auth_token)', 'url = f"https://api.twilio.com/2010-04-01/Accounts/{v}/Messages.json"'])


def _azure_storage(rng):
    v = _rand(rng, B64, 86) + "=="
    acct = rng.choice(FIRST) + rng.choice(["store", "data", "blobs", "logs"]) + str(rng.randint(1, 99))
    cs = f"DefaultEndpointsProtocol=https;AccountName={acct};AccountKey={v};EndpointSuffix=core.windows.net"
    if rng.random() < 0.25:
        return v, _in_context(rng, ["account_key", "azure_storage_key", "storage_account_key"], v,
                              ["az storage blob upload --account-name " + acct + " --account-key {v} -f a.csv"])
    return v, _in_context(rng, ["connection_string", "azure_storage_connection_string", "AzureWebJobsStorage",
                                "storage_conn_str"], cs,
                          ['blob = BlobServiceClient.from_connection_string("{v}")'])


def _google_api(rng):
    v = "AIza" + _rand(rng, URLSAFE, 35)
    return v, _in_context(rng, ["google_api_key", "maps_api_key", "firebase_api_key", "GOOGLE_KEY"], v,
                          ['url = "https://maps.googleapis.com/maps/api/geocode/json?address=x&key={v}"',
                           '<meta-data android:name="com.google.android.geo.API_KEY" android:value="{v}"/>',
                           "firebaseConfig = {{ apiKey: \"{v}\", authDomain: \"app.firebaseapp.com\" }}"])


def _openai(rng):
    if rng.random() < 0.5:
        v = "sk-" + _rand(rng, ALNUM, 20) + "T3BlbkFJ" + _rand(rng, ALNUM, 20)
    else:
        n = rng.choice([58, 74])
        v = f"sk-{rng.choice(['proj', 'svcacct', 'admin'])}-" + _rand(rng, URLSAFE, n) + "T3BlbkFJ" + _rand(rng, URLSAFE, n)
    return v, _in_context(rng, ["openai_api_key", "OPENAI_KEY", "llm_api_key"], v,
                          ['client = OpenAI(api_key="{v}")', "openai.api_key = '{v}'"])


def _npm(rng):
    if rng.random() < 0.25:  # a legacy npm token is a UUID, a key only in an .npmrc auth line
        v = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return v, rng.choice(["//registry.npmjs.org/:_authToken={v}", "//npm.pkg.github.com/:_authToken={v}"]).format(v=v)
    v = "npm_" + _rand(rng, ALNUM, 36)
    return v, _in_context(rng, ["npm_token", "NPM_AUTH_TOKEN", "node_auth_token"], v,
                          ["//registry.npmjs.org/:_authToken={v}", "echo '//registry.npmjs.org/:_authToken={v}' > .npmrc"])


def _jwt(rng):
    def part(obj: str) -> str:
        return base64.urlsafe_b64encode(obj.encode()).decode().rstrip("=")
    alg = rng.choice(["HS256", "RS256", "ES256"])
    v = (part(f'{{"alg":"{alg}","typ":"JWT"}}') + "."
         + part(f'{{"sub":"{rng.randint(1, 10**9)}","name":"{rng.choice(FIRST)}","iat":{rng.randint(10**9, 2 * 10**9)}}}')
         + "." + _rand(rng, URLSAFE, rng.choice([43, 86])))
    return v, _in_context(rng, ["jwt", "id_token", "session_token", "access_token"], v,
                          ["headers['Authorization'] = 'Bearer {v}'", "curl -H 'Authorization: Bearer {v}' https://api"])


def _private_key(rng):
    body = base64.b64encode(rng.randbytes(rng.choice([48 * 6, 48 * 12]))).decode()
    lines = "\n".join(body[i:i + 64] for i in range(0, len(body), 64))
    kind = rng.choice(["RSA ", "EC ", "OPENSSH ", "", "DSA ", "ENCRYPTED "])
    block = f"-----BEGIN {kind}PRIVATE KEY-----\n{lines}\n-----END {kind}PRIVATE KEY-----"
    return body[:64], rng.choice([f'PRIVATE_KEY = """{block}"""', f"# {block}".replace("\n", "\n# "),
                                  f'key = "{block}"'.replace("\n", "\\n"), block])


def _sendgrid(rng):
    v = "SG." + _rand(rng, URLSAFE, 22) + "." + _rand(rng, URLSAFE, 43)
    return v, _in_context(rng, ["sendgrid_api_key", "SENDGRID_KEY", "mail_api_key"], v,
                          ["sg = SendGridAPIClient('{v}')"])


def _heroku(rng):
    if rng.random() < 0.4:  # the older API key is a UUID: gitleaks only flags it next to "heroku"
        v = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        return v, _in_context(rng, ["heroku_api_key", "HEROKU_AUTH_TOKEN", "heroku_key"], v)
    v = "HRKU-AA" + _rand(rng, URLSAFE, 58)
    return v, _in_context(rng, ["heroku_api_key", "HEROKU_API_TOKEN"], v,
                          ["heroku_conn = heroku3.from_key('{v}')"])


def _mailgun(rng):
    v = "key-" + _rand(rng, HEX, 32)
    return v, _in_context(rng, ["mailgun_api_key", "MAILGUN_KEY", "mg_api_key"], v,
                          ['requests.post(url, auth=("api", "{v}"), data=msg)'])


def _huggingface(rng):
    v = "hf_" + _rand(rng, string.ascii_letters, 34)
    return v, _in_context(rng, ["hf_token", "HUGGINGFACE_TOKEN", "hub_token"], v,
                          ["huggingface-cli login --token {v}", 'login(token="{v}")'])


def _generic_secret(rng):
    """gitleaks' generic-api-key / detect-secrets' keyword plugin: a random value under a secret-ish name."""
    n = rng.choice([20, 24, 32, 40, 48, 64])
    v = _rand(rng, HEX, n) if rng.random() < 0.3 else _rand(rng, URLSAFE, n)
    names = ["secret_key", "api_key", "client_secret", "apiToken", "auth_token", "app_secret", "private_key",
             "access_token", "signing_secret", "webhook_secret", "encryption_key", "x-api-key", "credentials"]
    return v, _in_context(rng, names, v, ['headers = {{"X-Api-Key": "{v}"}}', "curl -H 'x-api-key: {v}' https://api"])


def _password(rng):
    """A password under a password-ish name: shorter than tokens, and with punctuation."""
    chars = ALNUM + PUNCT
    while True:
        v = _rand(rng, chars, rng.randint(10, 32))
        if sum(c in PUNCT for c in v) < len(v) / 3 and not v.startswith(("-", "+")):
            break
    names = ["password", "db_password", "admin_pass", "passwd", "smtp_password", "pwd", "root_password",
             "MYSQL_PASSWORD", "keystore_password"]
    return v, _in_context(rng, names, v, ["mysql -u root -p'{v}' app", 'conn = psycopg.connect(user="app", password="{v}")'])


def _bearer(rng):
    v = _rand(rng, ALNUM, rng.choice([32, 40]))
    return v, rng.choice([f'headers = {{"Authorization": "Bearer {v}"}}', f"curl -H 'Authorization: Bearer {v}'"])


def _url_password(rng):
    v = _rand(rng, ALNUM, rng.randint(10, 20))
    return v, rng.choice([f'DATABASE_URL = "postgres://app:{v}@db.internal:5432/prod"',
                          f"broker = 'amqp://guest:{v}@mq.example-corp.com//'", f"REDIS_URL=redis://:{v}@cache:6379/0"])


KEY_FAMILIES = {
    "aws_access_key_id": _aws_access_key_id, "aws_secret_access_key": _aws_secret_access_key, "github": _github,
    "gitlab": _gitlab, "slack": _slack, "stripe": _stripe, "twilio_api_key": _twilio_api_key,
    "twilio_account_sid": _twilio_account_sid, "azure_storage": _azure_storage, "google_api": _google_api,
    "openai": _openai, "npm": _npm, "jwt": _jwt, "private_key": _private_key, "sendgrid": _sendgrid,
    "heroku": _heroku, "mailgun": _mailgun, "huggingface": _huggingface, "generic_secret": _generic_secret,
    "password": _password, "bearer": _bearer, "url_password": _url_password,
}


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


def _positive(family: str, rng: random.Random, keep: set[str]) -> tuple[str, str, str]:
    """(pii type, value, line(s) of code holding it)."""
    if family == "email":
        e = _email(rng)
        name = rng.choice(FIRST).title() + " " + rng.choice(LAST).title()
        return "email", e, rng.choice([
            f"# Contact: {name} <{e}>", f'__author__ = "{name} <{e}>"', f'    "maintainer": "{e}",',
            f"# Report bugs to {e}.", f"MAIL_FROM = '{e}'", f'send_mail(to=["{e}"], subject="report")',
            f"// author: {e}", f" * @author {name} ({e})", f'<a href="mailto:{e}">{name}</a>',
            f"# [{name}](mailto:{e.upper()})", f"git commit --author='{name} <{e}>'"])
    if family == "ipv4":
        ip = _public_ipv4(rng, keep)
        return "ip_address", ip, rng.choice([
            f'HOST = "{ip}"', f"# the staging server runs at {ip}:8080", f'conn = connect("{ip}", 22)',
            f'ALLOWED = ["{ip}/32"]', f'url = "http://{ip}/api/v1"', f"const server = '{ip}';",
            f"ssh deploy@{ip}", f"server {ip} iburst", f"  host: {ip}"])
    if family == "ipv6":
        ip = _public_ipv6(rng)
        return "ip_address", ip, rng.choice([f'HOST6 = "{ip}"', f"# reach the box at [{ip}]:443",
                                             f"bind_address = '{ip}'"])
    value, code = KEY_FAMILIES[family](rng)
    return "key", value, code


# ----------------------------------------------------------------------------------- look-alikes
def _placeholder(rng):
    v = rng.choice([
        "YOUR_API_TOKEN_HERE", "YOUR_SECRET_KEY", "<your-api-key>", "<YOUR_TOKEN>", "your-secret-key-here",
        "INSERT_YOUR_KEY_HERE", "REPLACE_ME", "changeme", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", "********",
        "${API_KEY}", "${{ secrets.DEPLOY_TOKEN }}", "{{ vault_db_password }}", "%(password)s", "{password}",
        "sk_live_" + "x" * 24, "ghp_" + "X" * 36, "AKIA" + "X" * 16, "sk-" + "x" * 48, "AIza" + "X" * 35,
        "SK" + "x" * 32, "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "<password>",
        "npm_" + "0" * 36, "your-openai-api-key", "put-your-password-here", "TODO_SET_ME", "dummy-secret-for-tests",
    ])
    names = ["api_key", "api_token", "secret_key", "password", "auth_token", "client_secret", "github_token",
             "stripe_key", "aws_access_key_id", "openai_api_key"]
    return v, _in_context(rng, names, v)


def _env_name(rng):
    svc = rng.choice(["SERVICE", "STRIPE", "OPENAI", "GITHUB", "AWS", "SLACK", "TWILIO", "MY_APP", "BILLING", "DB"])
    suffix = rng.choice(["API_KEY", "SECRET_KEY", "AUTH_TOKEN", "SECRET_ACCESS_KEY", "PASSWORD", "TOKEN",
                         "CLIENT_SECRET", "PRIVATE_KEY"])
    v = f"{svc}_{suffix}" + rng.choice(["", "", "_V2", "_PROD", "_2024"])
    name = rng.choice(["api_key", "token", "secret", "password", "auth_token", "key"])
    return v, rng.choice([
        f'{name} = os.environ.get("{v}")', f'{name} = os.getenv("{v}", "")', f"{name} = os.environ['{v}']",
        f"const {name} = process.env.{v};", f'{name} = ENV["{v}"]', f'{name}_env = "{v}"', f"{name}_var: {v}",
        f'    "{name}_env_var": "{v}",', f'{name} := os.Getenv("{v}")', f'{name} = System.getenv("{v}");',
        f"  {name}: ${{{v}}}", f'env:\n  - name: {v}\n    valueFrom: {{secretKeyRef: {{name: app, key: {v.lower()}}}}}'])


def _unspecified_ip(rng):
    v = rng.choice(["0.0.0.0", "::"])
    return v, rng.choice([f'app.run(host="{v}", port=8000)', f"LISTEN = '{v}'", f"# bind to {v} to accept all",
                          f"server.bind(('{v}', 9000))", f"  host: {v}", f'--host {v}'])


def _netmask(rng):
    v = rng.choice(["255.255.255.0", "255.255.0.0", "255.255.255.128", "255.255.255.252", "255.255.255.255",
                    "255.255.240.0", "255.0.0.0"])
    return v, rng.choice([f'netmask = "{v}"', f"# mask {v}", f"ifconfig eth0 10.0.0.5 netmask {v} up",
                          f"SUBNET_MASK = '{v}'", f"  mask: {v}", f'BROADCAST = "{v}"'])


def _documentation_ip(rng):
    v = rng.choice([f"192.0.2.{rng.randint(1, 254)}", f"198.51.100.{rng.randint(1, 254)}",
                    f"203.0.113.{rng.randint(1, 254)}", f"2001:db8::{rng.randint(1, 0xffff):x}"])
    return v, rng.choice([f'HOST = "{v}"', f'conn = connect("{v}", 22)', f"# e.g. {v}:8080",
                          f'url = "http://{v}/api"' if ":" not in v else f'url = "http://[{v}]/api"',
                          f"  server: {v}", f"ssh admin@{v}"])


def _private_ip(rng):
    v = rng.choice([f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                    f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                    "127.0.0.1", f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.1", "fe80::1", "::1",
                    f"100.{rng.randint(64, 127)}.0.{rng.randint(1, 254)}", f"169.254.{rng.randint(0, 255)}.1"])
    return v, rng.choice([f'LOCAL_HOST = "{v}"', f"# listen on {v}", f"proxy = '{v}'", f"  host: {v}"])


def _resolver_ip(rng):
    v = rng.choice(["8.8.8.8", "1.1.1.1", "9.9.9.9", "8.8.4.4", "2001:4860:4860::8888", "2606:4700:4700::1111"])
    return v, rng.choice([f'NAMESERVERS = ["{v}"]', f"nameserver {v}", f"dig @{v} example.org"])


def _version(rng):
    parts = [rng.randint(0, 30), rng.randint(0, 300), rng.randint(0, 60), rng.randint(0, 255)]
    n = rng.choice([3, 4, 4])
    v = ".".join(map(str, parts[:n]))
    pkg = rng.choice(["numpy", "torch", "protobuf", "grpcio", "setuptools", "pywin32", "openssl"])
    contexts = [f"# requires {pkg}>={v}", f"# requires {pkg} >= {v}", f'version = "{v}"', f"__version__ = '{v}'",
                f"# Version: {v}", f'install_requires=["{pkg}=={v}"]', f"{pkg}~={v}", f'    "{pkg}": "^{v}",',
                f"if sys.version_info >= ({', '.join(map(str, parts[:3]))}):  # {v}"]
    if n == 3:  # a bare four-part number after a word reads as an address to anyone ("server web 1.2.3.4")
        contexts.append(f"# tested with {pkg} {v} and later")
    return v, rng.choice(contexts)


def _matmul(rng):
    a, b = rng.choice(["x", "h", "q", "emb", "inp", "hidden"]), rng.choice(["w", "y", "k", "W", "proj", "v"])
    v = rng.choice([f"{a} @ {b}.T", f"{a}@{b}.T", f"{a}@self.weight", f"{a}@self.{b}.weight.T", f"({a}@{b}.T)",
                    f"{a}@{b}.transpose(-2, -1)", f"{a}@self.data", f"{a} @ self.{b}.weight", f"{a}@{b}.mT"])
    return v, rng.choice([f"out = {v} + b", f"    return {v}", f"scores = ({v}) / math.sqrt(d)", f"# y = {v}"])


def _checksum(rng):
    algo = rng.choice([hashlib.md5, hashlib.sha1, hashlib.sha256, hashlib.sha512])
    v = algo(rng.randbytes(16)).hexdigest()
    sri = "sha512-" + base64.b64encode(hashlib.sha512(rng.randbytes(16)).digest()).decode()
    if rng.random() < 0.2:
        return sri, rng.choice([f'    "integrity": "{sri}",', f'<script src="a.js" integrity="{sri}"></script>'])
    return v, rng.choice([f'sha256 = "{v}"', f'expected_hash = "{v}"', f"checksum: '{v}'", f'key_digest = "{v}"',
                          f'cache_key = "{v}"', f"pkg==1.0 --hash=sha256:{v}", f"# sha256: {v}",
                          f'assert hashlib.sha256(data).hexdigest() == "{v}"', f'    "sha1": "{v}",',
                          f"{v}  dist/archive.tar.gz", f'secret_hash = "{v}"', f'token_sha256 = "{v}"'])


def _uuid(rng):
    v = str(uuid.UUID(int=rng.getrandbits(128), version=rng.choice([1, 4, 4, 5])))
    if rng.random() < 0.3:
        v = v.upper() if rng.random() < 0.5 else v.replace("-", "")
    return v, rng.choice([f'request_id = "{v}"', f'token_id = "{v}"', f'    "auth_uuid": "{v}",',
                          f'session_key = uuid.UUID("{v}")', f'client_id = "{v}"', f"tenant_id: {v}",
                          f'api_key_id = "{v}"', f'SECRET_NAME_GUID = "{v}"', f"# correlation id {v}"])


def _data_uri(rng):
    png = _png_base64(rng, rng.randint(20, 600))
    v = "data:image/png;base64," + png
    return png[:60], rng.choice([f'auth_logo = "{v}"', f'<img src="{v}" alt="logo">', f"background: url({v});",
                                 f'ICON = "{v}"', f"key_icon: {v}", f'token_badge = "{png}"', f'    "secret_icon": "{png}",'])


def _commit(rng):
    v = hashlib.sha1(rng.randbytes(16)).hexdigest()
    if rng.random() < 0.3:
        v = v[:rng.choice([7, 8, 12])]
    return v, rng.choice([f'commit = "{v}"', f"  rev: {v}", f"git checkout {v}", f"# fixed in {v}",
                          f'    "resolved": "git+https://github.com/org/repo.git#{v}",', f'GIT_SHA = "{v}"',
                          f'model = AutoModel.from_pretrained("org/model", revision="{v}")',
                          f"Merge: {hashlib.sha1(v.encode()).hexdigest()[:7]} {v}", f'source_rev = "{v}"'])


def _code_identifier(rng):
    v = "".join(rng.choice(["Proxy", "Basic", "Auth", "Handler", "HTTP", "Password", "Manager", "Token",
                            "Secret", "Key", "Provider", "Credential", "Store"]) for _ in range(4))
    v = rng.choice([v, _case(v, "snake"), _case(v, "upper")])
    return v, rng.choice([f'__all__ = ["{v}Token", "{v}"]', f'api_key = "{v}"', f"token_class: {v}",
                          f'secret_backend = "{v}"'])


def _email_lookalike(rng):
    v = rng.choice(["@property", "@npmcli/arborist", "icon@2x.png", "git@github.com:org/repo.git", "user@localhost",
                    "lodash@4.17.21", "@types/node@20.1.0", "ssh://git@gitlab.com/org/repo.git"])
    return v, f'X = "{v}"' if rng.random() < 0.5 else f"# see {v}"


def _other_code(rng):
    i = rng.randrange(7)
    if i == 0:
        return "OID = '1.3.6.1.4.1.311'", "OID = '1.3.6.1.4.1.311'"
    if i == 1:
        v = ":".join(f"{rng.randrange(256):02x}" for _ in range(6))
        return v, f'mac = "{v}"'
    if i == 2:
        v = f"#{rng.randrange(1 << 24):06x}"
        return v, f'color_key = "{v}"'
    if i == 3:
        return '"Bearer " + token', 'headers["Authorization"] = "Bearer " + token'
    if i == 4:
        v = rng.choice(["postgres://user:password@localhost/db", "redis://:${REDIS_PASSWORD}@cache:6379",
                        "https://{user}:{password}@host/path", "ftp://anonymous:****@ftp.example.org"])
        return v, f'URL = "{v}"'
    if i == 5:
        return "KEY_SIZE = 2048", "KEY_SIZE = 2048"
    return "token_type: access_token_for_service_account", "  token_type: access_token_for_service_account"


LOOKALIKES = {
    "placeholder": _placeholder, "env_var_name": _env_name, "unspecified_ip": _unspecified_ip, "netmask": _netmask,
    "documentation_ip": _documentation_ip, "private_ip": _private_ip, "resolver_ip": _resolver_ip,
    "version": _version, "matmul": _matmul, "checksum": _checksum, "uuid": _uuid, "data_uri": _data_uri,
    "commit_hash": _commit, "code_identifier": _code_identifier, "email_lookalike": _email_lookalike,
    "other_code": _other_code,
}
POSITIVE_FAMILIES = ["email"] * 4 + ["ipv4"] * 3 + ["ipv6"] + list(KEY_FAMILIES)


# -------------------------------------------------------------------------------------- base files
def stdlib_files(slice_: str) -> list[Path]:
    """The stdlib modules of one slice: a fixed split by a hash of the path, so tuning never sees holdout."""
    if slice_ not in SLICES:
        raise ValueError(f"slice must be one of {SLICES}, not {slice_!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(root.glob("*.py")) + sorted(p for p in root.glob("*/*.py") if "test" not in p.parts)
    want = SLICES.index(slice_)
    return [p for p in paths if hashlib.sha256(p.relative_to(root).as_posix().encode()).digest()[0] % 2 == want]


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
                       negatives_per_doc: int = 6, clean_frac: float = 0.25, keep_ips: list[str] = ()) -> list[Sample]:
    """``n_docs`` samples; ``clean_frac`` of them are real code with nothing planted but look-alikes."""
    rng = random.Random(seed)
    keep = set(keep_ips)
    samples = []
    for _ in range(n_docs):
        lines = rng.choice(base_texts).split("\n")
        sample = Sample("")
        inserts: list[str] = []
        if rng.random() >= clean_frac:
            for _ in range(positives_per_doc):
                family = rng.choice(POSITIVE_FAMILIES)
                typ, value, code = _positive(family, rng, keep)
                sample.planted.append((typ, family, value))
                inserts.append(code)
        for _ in range(negatives_per_doc):
            kind = rng.choice(list(LOOKALIKES))
            value, code = LOOKALIKES[kind](rng)
            sample.negatives.append((kind, value))
            inserts.append(code)
        for code in inserts:
            lines.insert(rng.randint(0, len(lines)), code)
        sample.text = "\n".join(lines)
        samples.append(sample)
    return samples


def labelled_set(slice_: str, n_docs: int, seed: int, keep_ips: list[str] = ()) -> list[Sample]:
    return build_labelled_set(clean_base_files(stdlib_files(slice_)), n_docs, seed, keep_ips=keep_ips)


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


@dataclass
class Report:
    types: dict[str, Score]
    families: dict[str, Score]  # recall per secret family / address kind
    lookalikes: Counter  # look-alike kind -> times planted
    broken: Counter  # look-alike kind -> times changed (wrongly)
    missed: list[tuple[str, str]] = field(default_factory=list)  # (family, value) not redacted
    broken_values: list[tuple[str, str]] = field(default_factory=list)


def score(samples: list[Sample], cfg: PIIConfig) -> Report:
    """Per-type scores, per-family recall, and the look-alikes that were (wrongly) changed."""
    rep = Report({t: Score() for t in TYPES}, {}, Counter(), Counter())
    for s in samples:
        red = redact_pii(s.text, cfg)
        for typ, family, value in s.planted:
            fam = rep.families.setdefault(family, Score())
            if value in red.text:
                rep.types[typ].fn += 1
                fam.fn += 1
                rep.missed.append((family, value))
            else:
                rep.types[typ].tp += 1
                fam.tp += 1
        for t in TYPES:
            rep.types[t].predicted += red.counts[t]
        for kind, value in s.negatives:
            rep.lookalikes[kind] += 1
            if value not in red.text:
                rep.broken[kind] += 1
                rep.broken_values.append((kind, value))
    return rep
