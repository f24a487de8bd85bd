"""PII redaction: unit cases with adversarial inputs, and precision/recall on a labelled set of real code."""

from __future__ import annotations

import pickle
import random
import sysconfig
from pathlib import Path

import pytest

from pipeline.config import PIIConfig
from benchmarks import pii_labelled
from pipeline.data.records import line_stats, make_doc
from pipeline.data.steps.pii import RedactPII, redact_pii

CFG = PIIConfig()
STDLIB = Path(sysconfig.get_paths()["stdlib"])


def red(text: str, cfg: PIIConfig = CFG):
    r = redact_pii(text, cfg)
    return r.text, r.counts


# ------------------------------------------------------------------------------------------ emails
@pytest.mark.parametrize("text, expected", [
    ('__author__ = "Jane Doe <jane.doe@example-corp.com>"', '__author__ = "Jane Doe <<EMAIL>>"'),
    ("# mail bob+spam@mail.acme.io, or anna@uni.de.", "# mail <EMAIL>, or <EMAIL>."),
    ("contact: ÉLODIE <elodie_99@posteo.net>\r\nnext", "contact: ÉLODIE <<EMAIL>>\r\nnext"),
    ("# [Bob](mailto:BOB.SMITH@EXAMPLE.CO.UK)", "# [Bob](mailto:<EMAIL>)"),
    (" *\t\tDonald Becker, <becker@super.org>", " *\t\tDonald Becker, <<EMAIL>>"),  # "super" is also a word in code
])
def test_emails_are_redacted(text, expected):
    out, counts = red(text)
    assert out == expected
    assert counts["email"] == expected.count("<EMAIL>")


@pytest.mark.parametrize("text", [
    "    @property\n    def x(self): ...",
    "const a = require('@npmcli/arborist')",
    'ICON = "static/icon@2x.png"',
    "y = x@w.T + b",
    "ssh user@localhost",
    'REMOTE = "git@github.com:org/repo.git"',
    "y = x @ y.T", "out = (x@self.weight) + b", "scores = q@k.mT", "attn = q@k.transpose(-2, -1)",  # matmul
    "h = emb@vocab.weight", 'MAINTAINER = "someone@host.invalid"',  # not an IANA top-level domain
    "",
])
def test_email_lookalikes_stay(text):
    assert red(text) == (text, {"email": 0, "ip_address": 0, "key": 0})


# --------------------------------------------------------------------------------------------- IPs
@pytest.mark.parametrize("text, n", [
    ('HOST = "93.184.216.34"', 1),
    ("# staging at 151.101.1.69:8080 and 2a00:1450:4001:81c::200e", 2),
    ('url = "http://[2606:2800:220:1:248:1893:25c8:1946]:80/"', 1),
    ('ALLOWED = ["52.95.110.1/32"]', 1),
    ('HOST = "12.34.5.6"; ssh 4.3.2.1:22; route via host 41.2.3.4', 3),  # small parts, address context
    ('mapped = "::ffff:93.184.216.34"; embedded = "2a00:1450::93.184.216.34"', 2),  # one redaction each
])
def test_public_ips_are_redacted(text, n):
    out, counts = red(text)
    assert counts["ip_address"] == n
    assert out.count("<IP_ADDRESS>") == n


@pytest.mark.parametrize("text", [
    'version = "1.2.3.4"', "__version__ = '10.0.0.1'", 'requires = ["pkg==2.7.1.3"]', "# Version: 5.6.7.8",
    'NS = ["8.8.8.8", "1.1.1.1", "9.9.9.9", "2001:4860:4860::8888"]',
    'PRIVATE = ["192.168.1.1", "10.0.0.7", "172.16.5.4", "127.0.0.1", "100.64.0.1", "169.254.1.1"]',
    'DOCS = ["203.0.113.7", "198.51.100.3", "192.0.2.15", "2001:db8::1", "fe80::1%eth0", "::1", "::"]',
    'app.run(host="0.0.0.0", port=8000)', "ifconfig eth0 10.0.0.5 netmask 255.255.255.0 up", 'MASK = "255.255.240.0"',
    "# requires numpy>=1.21.0.1", '    "protobuf": "^5.170.27.71",', "grpcio~=1.60.0.1",
    "/* 4.3.2.1 Class-Specific AC Interface Descriptor */",  # spec section numbers (kernel headers)
    "        // 5.2.1.1",
    "        // 5.2.1.1\r\n        x();\r\n",
    "// Client workflow 5.4.3.1: check for rollback attack",
    "/* 802.3ad port state definitions (43.4.2.2 in the 802.3ad standard) */",
    "/* 30.3.3.3 aMACControlFramesTransmitted */",
    "        2.7.2.2\n        1.3.a4",
    "OID = '1.3.6.1.4.1.311.60.2.1.3'",
    "EXTENSION_OID_KEY_USAGE = '2.5.29.15'",
    "std::vector<int> a; Foo::Bar; abc::def; t = '12:34:56'; mac = '00:1a:2b:3c:4d:5e'; m2 = 2a:00:14:50:40:01",
    "x = a[::2]; 1.2.3.4.5; 256.1.1.1",
    "MULTICAST = '224.0.0.251'",
])
def test_ip_lookalikes_stay(text):
    out, counts = red(text)
    assert counts["ip_address"] == 0, out
    assert out == text


# -------------------------------------------------------------------------------------------- keys
AZURE_KEY = "4GZqT8hqt0pmpsLww0sAO/DGpUxjKbgRBWZRZX1VlxeVZ4DNCNnOBFXL4k41GiLP9qG3L0uKW4yWRzSaTLyvH1=="
PNG_B64 = ("iVBORw0KGgoAAAANSUhEUgAAAAMAAAAECAIAAADETxJQAAAAMUlEQVR4nGOQtvtk+Kix7947BptlPWI7D185Zsvw8nqFzytRQUNZ"
           "Br+2dlWWvTa7nQB7AhFtOg8KtQAAAABJRU5ErkJggg==")
RSA_BODY = "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun\nVTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK\n"


@pytest.mark.parametrize("text, secret", [
    ('AWS_ACCESS_KEY_ID = "AKIAQ3EGRQ7N5XJ2WKPL"', "AKIAQ3EGRQ7N5XJ2WKPL"),
    ("aws_secret_access_key = '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'", "hT9s0Ejq/3vR+Lk2mWb7ZyPqN4cUx8dA1oG6fKzV"),
    ('GITHUB_TOKEN = "ghp_16C7e42F292c6912E7710c838347Ae178B4a"', "ghp_16C7e42F292c6912E7710c838347Ae178B4a"),
    ("gh = Github('github_pat_11ABCDEFG0abcdefghijkl_Qm4v8XrT2pLk9sWz3NbY7cHd5FgJ1eRtU6oPiA0lKqMnBvCx8Zy2W')",
     "github_pat_11ABCDEFG0"),
    ('SLACK = "xoxb-263594206564-2343594206574-FGqddMF8t08v8N7Oq4i57vs1"', "xoxb-263594206564"),
    ("stripe.api_key = 'sk_live_4eC39HqLyjWDarjtT1zdp7dc'", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ('SECRET_KEY = "k3J9x_Qz8vLw2Rt5Yb7Nm4Hc6Fg1Dp0S"', "k3J9x_Qz8vLw2Rt5Yb7Nm4Hc6Fg1Dp0S"),
    ('    "client_secret": "9f8e7d6c5b4a39281706f5e4d3c2b1a0",', "9f8e7d6c5b4a39281706f5e4d3c2b1a0"),
    ("export DB_PASSWORD=Xq7pL2vR9sT4wZ8yB3nM6kJ1\n", "Xq7pL2vR9sT4wZ8yB3nM6kJ1"),
    ("REM windows\r\nSET_API_KEY=Xq7pL2vR9sT4wZ8yB3nM6kJ1\r\nnext\r\n", "Xq7pL2vR9sT4wZ8yB3nM6kJ1"),  # CRLF
    ("const apiToken = `Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFi`;", "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFi"),
    ('KEY = """-----BEGIN RSA PRIVATE KEY-----\n' + RSA_BODY + '-----END RSA PRIVATE KEY-----"""', "MIIEowIBAAKCAQEA"),
    ('k = "-----BEGIN OPENSSH PRIVATE KEY-----\\n' + RSA_BODY.replace("\n", "\\n") + '-----END OPENSSH PRIVATE KEY-----"',
     "MIIEowIBAAKCAQEA"),
    ("-----BEGIN PRIVATE KEY-----\n" + RSA_BODY, "MIIEowIBAAKCAQEA"),  # truncated block, no END line
    ('JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"',
     "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"),
    ("curl -H 'Authorization: Bearer q8Zr3LmW0pXv7NcT2yKb5HdF'", "q8Zr3LmW0pXv7NcT2yKb5HdF"),
    ('DATABASE_URL = "postgres://app:Tr0ub4dor3x@db.internal:5432/prod"', "Tr0ub4dor3x"),
    ("REDIS_URL=redis://:Tr0ub4dor3x@cache:6379/0", "Tr0ub4dor3x"),  # no user name
    ("  client_secret: Xq7pL2vR9sT4wZ8yB3nM6kJ1\n", "Xq7pL2vR9sT4wZ8yB3nM6kJ1"),  # YAML, unquoted
    # provider formats (gitleaks / detect-secrets rule shapes)
    ('TWILIO_API_KEY = "SKcc6577428c2f6d6bc64e5a22fac180d6"', "SKcc6577428c2f6d6bc64e5a22fac180d6"),
    ('client = Client("ACb2e6e1b465e551305fd2d2490ca4c616", auth_token)', "ACb2e6e1b465e551305fd2d2490ca4c616"),
    ('url = f"https://api.twilio.com/2010-04-01/Accounts/ACb2e6e1b465e551305fd2d2490ca4c616/Messages.json"',
     "ACb2e6e1b465e551305fd2d2490ca4c616"),
    ('conn = "DefaultEndpointsProtocol=https;AccountName=logs1;AccountKey=' + AZURE_KEY + ';EndpointSuffix=core.windows.net"',
     AZURE_KEY),
    ('maps_key = "AIzaD0SZaozaNv4AH17KzcnNjeh1MVLymYZwH6Q"', "AIzaD0SZaozaNv4AH17KzcnNjeh1MVLymYZwH6Q"),
    ("client = OpenAI(api_key='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')", "sk-i4i5C32SSyAJ9TlxqnrDT3BlbkFJ"),
    ("k = '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'",
     "T3BlbkFJos-bDWmE4kuv4VG"),
    ("//registry.npmjs.org/:_authToken=npm_i59lOtd4qlLWBja7PcGz7CekLovBiE6NfxGk", "npm_i59lOtd4qlLWBja7PcGz7CekLovBiE6NfxGk"),
    ("//registry.npmjs.org/:_authToken=0b5d2c9e-3f1a-4e8b-9c7d-6a5b4c3d2e1f", "0b5d2c9e-3f1a-4e8b-9c7d-6a5b4c3d2e1f"),
    ("sg = SendGridAPIClient('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')", "SG.D_Am3zwr8Fw"),
    ("HEROKU_API_TOKEN=HRKU-AAcdwBCRGja3o3kV-2WHPSoIFieCIPnINFB44cHjXpcK-42PEnKYAiJ6_Rkc", "HRKU-AAcdwBCRGja3o3kV"),
    ('heroku_api_key = "0b5d2c9e-3f1a-4e8b-9c7d-6a5b4c3d2e1f"', "0b5d2c9e-3f1a-4e8b-9c7d-6a5b4c3d2e1f"),
    ('requests.post(url, auth=("api", "key-124d6d003a6630d95495d395dc328985"))', "key-124d6d003a6630d95495d395dc328985"),
    ('gl = gitlab.Gitlab(url, private_token="glpat-JpeiG8YqL9BN5GGx6Kty")', "glpat-JpeiG8YqL9BN5GGx6Kty"),
    ("huggingface-cli login --token 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", "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"),
    ("git clone https://ghp_16C7e42F292c6912E7710c838347Ae178B4a@github.com/org/repo.git", "ghp_16C7e42F292c6912E7"),
    # passwords (shorter, with punctuation) and the other places a named value sits
    ('conn = psycopg.connect(user="app", password="V3@q&SgQYTPe")', "V3@q&SgQYTPe"),
    ("export MYSQL_PASSWORD=V3@q&SgQYTPePAqCPc", "V3@q&SgQYTPePAqCPc"),
    ('{"config.ini": "ROOT_PASSWORD=8bpw^S&GcANwso\\nBACKUP_ENABLED=true"}', "8bpw^S&GcANwso"),
    ("<apiKey>\n    Xq7pL2vR9sT4wZ8yB3nM6kJ1\n</apiKey>", "Xq7pL2vR9sT4wZ8yB3nM6kJ1"),
    ("deploy --api-token Xq7pL2vR9sT4wZ8yB3nM6kJ1 --verbose", "Xq7pL2vR9sT4wZ8yB3nM6kJ1"),
    ('var apiToken string = "Xq7pL2vR9sT4wZ8yB3nM6kJ1"', "Xq7pL2vR9sT4wZ8yB3nM6kJ1"),
    ('$apiToken .= "Xq7pL2vR9sT4wZ8yB3nM6kJ1";', "Xq7pL2vR9sT4wZ8yB3nM6kJ1"),
    ('config["DB_PASSWORD"] = "tnYoqHH3.x.wJ1"', "tnYoqHH3.x.wJ1"),
    ("curl 'https://api.example.org/v1?api_key=Xq7pL2vR9sT4wZ8yB3nM6kJ1&page=2'", "Xq7pL2vR9sT4wZ8yB3nM6kJ1"),
])
def test_keys_are_redacted(text, secret):
    out, counts = red(text)
    assert counts["key"] == 1, out
    assert secret not in out and "<KEY>" in out


@pytest.mark.parametrize("text", [
    'token_id = "123e4567-e89b-12d3-a456-426614174000"',  # UUID
    'sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"',
    'key_digest = "d41d8cd98f00b204e9800998ecf8427e"',  # md5 in a hash-ish context
    'commit_key = "da39a3ee5e6b4b0d3255bfef95601890afd80709"',  # sha1
    'auth_logo = "' + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg" * 8 + '"',
    '__all__ = ["HTTPPasswordMgrWithDefaultRealm", "ProxyBasicAuthHandler"]',
    'password = "changeme"', "api_key = os.environ['API_KEY']", 'TOKEN_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"',
    'auth_path = "/usr/local/share/auth/keys.txt"', "KEY_SIZE = 2048",
    "blob = '" + "QUtJQUlPU0ZPRE5ON0VYQU1QTEVRQUtJQQ" + "'",  # AKIA inside base64 is not a key
    "key = 'x' * 100000",
    'URLS = ["postgres://user:password@localhost/db", "redis://:${REDIS_PASSWORD}@cache:6379"]',
    'URL = "https://{user}:{password}@host/path"',
    'headers["Authorization"] = "Bearer " + token',
    "  token_type: access_token_for_service_account",
    "jwt_prefix = 'eyJhbGciOi'  # not a whole token",
    # placeholders, documentation values, environment-variable names
    'API_TOKEN = "YOUR_API_TOKEN_HERE"', 'api_key: "<your-api-key>"', "SECRET_KEY=${SECRET_KEY}", 'password = "********"',
    'token = "{{ vault_deploy_token }}"', 'stripe_key = "sk_live_xxxxxxxxxxxxxxxxxxxxxxxx"',
    'AWS_ACCESS_KEY_ID = "AKIAIOSFODNN7EXAMPLE"', "aws_secret_access_key = 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'",
    'GITHUB_TOKEN = "ghp_XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX"', 'db_password = "%(password)s"',
    'api_key = os.environ.get("SERVICE_API_KEY")', 'token = os.getenv("MY_APP_API_KEY_V2", "")',
    "const password = process.env.TWILIO_API_KEY_2024;", '    "api_key_env_var": "BILLING_SECRET_ACCESS_KEY_2024",',
    "api_key_var: STRIPE_SECRET_KEY_PROD", "password = self.conf.db_password_v2",
    # checksums, UUIDs, commits, images
    "pkg==1.0 --hash=sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    'token_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"',
    '    "integrity": "sha512-z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg==",',
    'api_key_id = "0b5d2c9e3f1a4e8b9c7d6a5b4c3d2e1f"', 'session_key = uuid.UUID("0B5D2C9E-3F1A-4E8B-9C7D-6A5B4C3D2E1F")',
    'source_rev = "da39a3ee5e6b4b0d3255bfef95601890afd80709"', "  rev: da39a3ee5e6b4b0d3255bfef95601890afd80709",
    'model = AutoModel.from_pretrained("org/m", revision="da39a3ee5e6b4b0d3255bfef95601890afd80709")',
    f'token_badge = "{PNG_B64}"', f'auth_logo = "data:image/png;base64,{PNG_B64}"', f"key_icon: data:image/png;base64,{PNG_B64}",
    "('http', 'user/name', 'password', 'localhost:22')",
])
def test_key_lookalikes_stay(text):
    out, counts = red(text)
    assert counts["key"] == 0, out
    assert out == text


def test_random_map_keys_are_not_secret_names():
    """JSON data: random ids as keys, random values; only a real secret-ish name makes a value a key."""
    rows = [f'  "x8KeYq2Lm9Zp3Rt{i:04d}": "q8Zr3LmW0pXv7NcT2yKb5HdF{i:04d}",' for i in range(200)]
    out, counts = red("{\n" + "\n".join(rows) + '\n  "apiKey": "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5"\n}')
    assert counts["key"] == 1 and "Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5" not in out


def test_overlapping_detections_count_once():
    text = 'password = "AKIAQ3EGRQ7N5XJ2WKPL1234"\nkey = "-----BEGIN EC PRIVATE KEY-----\nabc@def.com 93.184.216.34\n-----END EC PRIVATE KEY-----"'
    out, counts = red(text)
    assert counts == {"email": 0, "ip_address": 0, "key": 2}
    assert "abc@def.com" not in out


def test_disabled_types_and_huge_line_and_unicode():
    text = "é" * 100_000 + " bob@example.org " + "x" * 200_000 + " 93.184.216.34\n"
    out, counts = red(text, PIIConfig(emails=False))
    assert counts == {"email": 0, "ip_address": 1, "key": 0} and "bob@example.org" in out
    assert red(text, PIIConfig(enabled=False))[0] == text


def test_transform_recomputes_stats_keeps_id_and_pickles():
    doc = make_doc("s", "a.py", "python", 'x = 1\nOWNER = "someone.with.a.long.name@example-corp.com"\n')
    step = pickle.loads(pickle.dumps(RedactPII(CFG)))
    out = step.process(dict(doc))
    assert out["id"] == doc["id"]
    assert out["pii_redactions"] == {"email": 1, "ip_address": 0, "key": 0}
    assert out["content"] == 'x = 1\nOWNER = "<EMAIL>"\n'
    assert {k: out[k] for k in line_stats(out["content"])} == line_stats(out["content"])
    assert out["max_line_len"] < doc["max_line_len"]
    assert out["size_bytes"] == len(out["content"].encode())


# ---------------------------------------------------------------------- precision / recall (labelled)
# The detector was tuned on the "tune" half of the stdlib files with seed 0; these draws use the other
# half ("holdout") and seeds never used while tuning.
@pytest.fixture(scope="module")
def holdout_base() -> list[str]:
    base = pii_labelled.clean_base_files(pii_labelled.stdlib_files("holdout"))
    assert len(base) >= 100
    return base


def test_targets_per_type_on_a_held_out_draw(holdout_base):
    """The issue's targets, recall >= 0.98 and precision >= 0.95, for every type; no look-alike changed."""
    samples = pii_labelled.build_labelled_set(holdout_base, n_docs=150, seed=2, keep_ips=CFG.keep_ips)
    rep = pii_labelled.score(samples, CFG)
    planted = {t: s.tp + s.fn for t, s in rep.types.items()}
    assert planted["email"] >= 40 and planted["ip_address"] >= 40 and planted["key"] >= 250, planted
    for t, s in rep.types.items():
        assert s.recall >= 0.98 and s.precision >= 0.95, (t, s, rep.missed)
    assert set(rep.families) == set(pii_labelled.POSITIVE_FAMILIES)
    assert set(rep.lookalikes) == set(pii_labelled.LOOKALIKES)
    assert not rep.broken, rep.broken_values


def _planted(base: list[str], code: str, rng: random.Random) -> str:
    lines = rng.choice(base).split("\n")
    lines.insert(rng.randint(0, len(lines)), code)
    return "\n".join(lines)


@pytest.mark.parametrize("family", sorted(pii_labelled.KEY_FAMILIES))
def test_each_secret_family_is_redacted(family, holdout_base):
    """40 fresh draws of each provider family, each planted in a real file: at most one may be missed."""
    rng = random.Random(f"family:{family}")
    missed = []
    for _ in range(40):
        value, code = pii_labelled.KEY_FAMILIES[family](rng)
        red = redact_pii(_planted(holdout_base, code, rng), CFG)
        if value in red.text or red.counts["key"] == 0:
            missed.append(code)
    assert len(missed) <= 1, missed


@pytest.mark.parametrize("kind", sorted(pii_labelled.LOOKALIKES))
def test_each_lookalike_kind_is_left_alone(kind, holdout_base):
    """40 fresh draws of each look-alike kind, each planted in a real file without PII: nothing redacted."""
    rng = random.Random(f"lookalike:{kind}")
    for _ in range(40):
        value, code = pii_labelled.LOOKALIKES[kind](rng)
        red = redact_pii(_planted(holdout_base, code, rng), CFG)
        assert value in red.text and red.counts == {"email": 0, "ip_address": 0, "key": 0}, (code, red.counts)


def test_real_code_without_pii_is_left_alone():
    """Stdlib modules full of hashes, base64, versions and dotted numbers: no redaction at all."""
    for name in ("hashlib.py", "base64.py", "uuid.py", "secrets.py", "hmac.py", "platform.py", "tarfile.py"):
        text = (STDLIB / name).read_text(encoding="utf-8")
        out, counts = red(text)
        assert counts["key"] == 0, (name, counts)
        assert counts["ip_address"] == 0, (name, counts)
