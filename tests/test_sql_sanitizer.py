"""The agent's SQL sanitizer: no literal survives, whatever the statement looks like.

Pure unit tests. Every hostile case carries a marker literal (SECRET, 4242...) that must not
appear in the output; the well-formed cases compare with the exact expected shape.
"""

from __future__ import annotations

import pytest

from ebpf_apm.producer.sql_sanitizer import MAX_STATEMENT_BYTES, sanitize, sql_operation


@pytest.mark.parametrize(
    "statement,expected",
    [
        (
            "SELECT * FROM users WHERE email = 'a@b.c' AND age > 42",
            "SELECT * FROM users WHERE email = ? AND age > ?",
        ),
        (
            "INSERT INTO t (a, b, c) VALUES (1, 'x', 2.5e-3)",
            "INSERT INTO t (a, b, c) VALUES (?, ?, ?)",
        ),
        (
            "update t set flag = TRUE, n = -7 where id = $1",
            "update t set flag = ?, n = -? where id = $1",
        ),
        ("SELECT 0xDEADbeef, .5, 1_000", "SELECT ?, ?, ?"),
        (
            "SELECT x FROM t1 JOIN t2 ON t1.id = t2.t1_id",
            "SELECT x FROM t1 JOIN t2 ON t1.id = t2.t1_id",
        ),
        ('SELECT "Weird Col" FROM "T"', 'SELECT "Weird Col" FROM "T"'),
        (
            "SELECT a   FROM\n\tt  -- trailing comment\n WHERE b IS NULL",
            "SELECT a FROM t WHERE b IS NULL",
        ),
        ("SELECT :name, @p1, ?", "SELECT :name, @p1, ?"),
        ("SELECT 'it''s'", "SELECT ?"),
    ],
)
def test_literals_become_placeholders(statement: str, expected: str) -> None:
    assert sanitize(statement) == expected


SECRET_CASES = [
    "SELECT 'SECRET",  # unterminated string (cut by the capture)
    "SELECT 'abc' || 'SECRET",
    "SELECT E'it\\'s SECRET' FROM t",  # E'' with an escaped quote
    "SELECT e'\\\\' , 'SECRET'",
    "SELECT $$SECRET$$, $tag$ SECRET 'x' $tag$",
    "SELECT $body$ SECRET",  # unterminated dollar quote
    "SELECT $a$ $b$ SECRET $b$ $a$",
    "SELECT 1 /* SECRET */ FROM t",
    "SELECT 1 /* outer /* inner */ SECRET */ FROM t",  # PostgreSQL nests comments
    "SELECT 1 /* SECRET",  # unterminated comment
    "SELECT 1 -- it's SECRET\nFROM t",
    "SELECT X'5345435245', B'1010', N'SECRET', U&'SECRET'",
    "SELECT 'SECRET\u00e9\u4e2d\u6587' AS \u540d\u524d",
    "SELECT '\U0001f600 SECRET'",
    "SELECT 'a', 'b', 'SECRET', 4242",
    "SELECT \u0664\u0662\u0664\u0662",  # Arabic-Indic digits
    "SELECT 4242abc",
    "'SECRET",
    "'''SECRET'",  # a quote inside a string
]


@pytest.mark.parametrize("statement", SECRET_CASES)
def test_no_literal_survives_hostile_input(statement: str) -> None:
    out = sanitize(statement)
    for marker in ("SECRET", "4242", "\u00e9", "\U0001f600", "\u0664", "5345", "1010"):
        assert marker not in out, (statement, out)


@pytest.mark.parametrize("statement", SECRET_CASES)
def test_every_cut_of_a_hostile_statement_leaks_nothing(statement: str) -> None:
    """The kernel captures a prefix: every prefix must be as safe as the whole."""
    for end in range(len(statement) + 1):
        out = sanitize(statement[:end])
        assert "SECRET" not in out and "4242" not in out, (statement[:end], out)


def test_mysql_quoting() -> None:
    assert sanitize("SELECT \"SECRET\" FROM `t` WHERE a = 'x\\'SECRET'", "mysql") == (
        "SELECT ? FROM `t` WHERE a = ?"
    )
    assert "SECRET" not in sanitize("SELECT 1 # SECRET\n", "mysql")


def test_output_is_bounded_and_cut_between_tokens() -> None:
    statement = "SELECT " + ", ".join(f"column_{i}" for i in range(200)) + " FROM t"
    out = sanitize(statement)
    assert len(out.encode()) <= MAX_STATEMENT_BYTES
    assert statement.startswith(out)
    assert out.rsplit(" ", 1)[-1].rstrip(",") in {f"column_{i}" for i in range(200)}
    wide = "SELECT " + "\u540d" * 300
    assert len(sanitize(wide).encode()) <= MAX_STATEMENT_BYTES


def test_any_text_is_accepted() -> None:
    for statement in ["", " ", "\x00\x01'", "$", "$1$", "/*", "*/", "--", "E", "U&", "\ud800"]:
        assert isinstance(sanitize(statement), str)


@pytest.mark.parametrize(
    "statement,operation",
    [
        ("select 1", "SELECT"),
        ("  INSERT INTO t VALUES (?)", "INSERT"),
        ("/* c */ delete from t", "DELETE"),
        ("WITH x AS (SELECT 1) UPDATE t SET a = ?", "UPDATE"),
        ("BEGIN", "BEGIN"),
        ("", ""),
        ("42", ""),
    ],
)
def test_operation(statement: str, operation: str) -> None:
    assert sql_operation(sanitize(statement)) == operation
