"""Bad ``workload_identity`` files and the one-line error each must give (``{f}`` is the path).

Shared by the parser's unit tests and the ``sds workload-api`` CLI tests, which must
report the same message for the same file.
"""

from __future__ import annotations

from tests.harness.provider import WEB


def bad_identity(replacement: str) -> str:
    return WEB.replace("{id: /svc/web, hint: web}", replacement)


IDENTITY_CASES: dict[str, tuple[bytes, str]] = {
    "non-UTF-8": (b"kind: workload_identity\n\xff\xfe\n", "{f}: not UTF-8 text"),
    "impossible date": (
        (
            WEB.replace("metadata: {name: web}", "metadata: {name: web, expires: 2024-02-30}")
        ).encode(),
        "{f}: document 1: invalid YAML value: day is out of range for month",
    ),
    "5,000-digit integer": (
        (
            WEB + "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, "
            f"eq: {{value: {'9' * 5000}}}}}]}}]}}\n"
        ).encode(),
        "{f}: document 1: invalid YAML value: integer with too many digits",
    ),
    "uid out of range": (
        (
            WEB + "  rules: {allow: [{conditions: [{attribute: workload.unix.uid, "
            "eq: {value: 4294967296}}]}]}\n"
        ).encode(),
        "{f}: document 1: spec.rules.allow[0].conditions[0].eq.value: 4294967296 is out of "
        "range (at most 4294967295)",
    ),
    "deep nesting": (
        ("[" * 2000 + "]" * 2000).encode(),
        "{f}: document 1: invalid YAML value: nested too deeply",
    ),
    "wrong type": (
        WEB.replace("metadata: {name: web}", "metadata: 5").encode(),
        "{f}: document 1: metadata: want a mapping, got integer",
    ),
    "full SPIFFE ID": (
        bad_identity("{id: 'spiffe://example.org/svc/web'}").encode(),
        "{f}: document 1: spec.spiffe.id: 'spiffe://example.org/svc/web' is a full SPIFFE "
        "ID; give the path only (the trust domain is example.org)",
    ),
    "TTL overflow": (
        bad_identity("{id: /w, x509: {maximum_ttl: 99999999999h}}").encode(),
        "{f}: document 1: spec.spiffe.x509.maximum_ttl: duration '99999999999h' is longer "
        "than 87600h",
    ),
    "NUL": (b"kind: workload_identity\x00\n", "{f}: invalid YAML: "),
    # The strict YAML rules shared with the bridge config (sds/_util/strictyaml.py):
    "non-plain key": (
        b"? [a]\n: 1\n",
        "{f}: document 1: line 1: invalid YAML: a key must be a plain value",
    ),
    "merge overriding a key": (
        b"a: &a {x: 1}\nb: {<<: *a, x: 2}\n",
        "{f}: document 1: line 2: invalid YAML: duplicate key 'x'",
    ),
}
