"""SQL statement text -> its shape, without literals, before it leaves the node.

A statement a program sends to its database can carry anything its users typed: names,
e-mail addresses, passwords. The agent keeps the statement's shape and replaces every literal
with ``?``:

    SELECT * FROM users WHERE email = 'a@b.c' AND age > 42  ->
    SELECT * FROM users WHERE email = ? AND age > ?

What counts as a literal: quoted strings ('...', with '' inside; E'...' with backslash
escapes; B'', X'', N'' and U&'' prefixes), dollar-quoted strings ($$...$$, $tag$...$tag$),
numbers (integers, decimals, exponents, 0x hex), and TRUE/FALSE. Comments (``--`` to the end
of the line, ``/* */`` nested as PostgreSQL nests them, MySQL's ``#``) are dropped whole:
they are free text. Placeholders ($1, ?, :name, @p) and identifiers stay, double-quoted
identifiers too (MySQL: double quotes delimit strings, so they become ``?``). Runs of white
space become one space.

The text is cut at the end, not in the middle of a token: the kernel captures the first
bytes of a statement (bpf/events.h CLIENT_TEXT_MAX), so the captured text may end inside a
literal or a comment. An unterminated string, dollar string, or comment runs to the end and
is replaced (or dropped) whole, so a cut can only lose text, never reveal a literal. The
result is at most ``limit`` UTF-8 bytes, cut between tokens or replacing a cut token by
nothing.

Pure and total: any str in, a str out, no exception (it runs on the agent's hot path on
whatever a traced program sends).
"""

from __future__ import annotations

__all__ = ["MAX_STATEMENT_BYTES", "sanitize", "sql_operation"]

MAX_STATEMENT_BYTES = 256
_LITERAL_WORDS = frozenset({"TRUE", "FALSE"})
_STRING_PREFIXES = frozenset({"E", "B", "X", "N"})  # E'..', B'..', X'..', N'..'
_OPERATIONS = frozenset(
    {"SELECT", "INSERT", "UPDATE", "DELETE", "MERGE", "UPSERT", "REPLACE", "CALL", "VALUES"}
)


def _ident_start(ch: str) -> bool:
    return ch == "_" or ch.isalpha()


def _ident_part(ch: str) -> bool:
    return ch == "_" or ch == "$" or ch.isalnum()


def _skip_quoted(text: str, i: int, quote: str, backslash: bool) -> int:
    """Index after the string whose opening quote is at ``i`` (len(text): unterminated)."""
    n = len(text)
    j = i + 1
    while j < n:
        ch = text[j]
        if backslash and ch == "\\":
            j += 2
            continue
        if ch == quote:
            if j + 1 < n and text[j + 1] == quote:  # '' inside a string
                j += 2
                continue
            return j + 1
        j += 1
    return n


def _closed(text: str, i: int, end: int) -> bool:
    """The quoted token text[i:end] has its closing quote (not cut off by the capture)."""
    return end >= i + 2 and text[end - 1] == text[i]


def _dollar_tag(text: str, i: int) -> str | None:
    """The dollar-quote opener ($$ or $tag$) at ``i``, None if there is none."""
    n = len(text)
    j = i + 1
    if j < n and text[j] == "$":
        return "$$"
    if j < n and _ident_start(text[j]):
        while j < n and (text[j] == "_" or text[j].isalnum()):
            j += 1
        if j < n and text[j] == "$":
            return text[i : j + 1]
    return None


def _skip_block_comment(text: str, i: int, nested: bool) -> int:
    n = len(text)
    depth = 1
    j = i + 2
    while j < n:
        if text.startswith("*/", j):
            depth -= 1
            j += 2
            if depth == 0:
                return j
        elif nested and text.startswith("/*", j):
            depth += 1
            j += 2
        else:
            j += 1
    return n


def _tokens(text: str, system: str) -> list[str]:
    """The statement as tokens, literals already replaced by "?", comments dropped and
    white space as single " " tokens."""
    mysql = system == "mysql"
    out: list[str] = []
    n = len(text)
    i = 0

    def space() -> None:
        if out and out[-1] != " ":
            out.append(" ")

    while i < n:
        ch = text[i]
        if ch.isspace():
            space()
            i += 1
        elif text.startswith("--", i) or (mysql and ch == "#"):
            end = text.find("\n", i)
            i = n if end < 0 else end
            space()
        elif text.startswith("/*", i):
            i = _skip_block_comment(text, i, nested=not mysql)
            space()
        elif ch == "'":
            i = _skip_quoted(text, i, "'", backslash=mysql)
            out.append("?")
        elif ch == '"':  # an identifier; MySQL: a string
            end = _skip_quoted(text, i, '"', backslash=mysql)
            out.append(text[i:end] if not mysql and _closed(text, i, end) else "?")
            i = end
        elif ch == "`":  # a MySQL identifier
            end = _skip_quoted(text, i, "`", backslash=False)
            out.append(text[i:end] if _closed(text, i, end) else "?")
            i = end
        elif ch == "$":
            tag = _dollar_tag(text, i)
            if tag is not None:
                end = text.find(tag, i + len(tag))
                i = n if end < 0 else end + len(tag)
                out.append("?")
            else:  # a placeholder $1, or a lone $
                j = i + 1
                while j < n and text[j].isdigit() and text[j].isascii():
                    j += 1
                out.append(text[i:j])
                i = j
        elif ch.isdigit() or (ch == "." and i + 1 < n and text[i + 1].isdigit()):
            i = _skip_number(text, i)
            out.append("?")
        elif ch.isnumeric():  # other numerals (e.g. fractions, Roman numerals): literal
            i += 1
            out.append("?")
        elif _ident_start(ch):
            j = i + 1
            while j < n and _ident_part(text[j]):
                j += 1
            word = text[i:j]
            upper = word.upper()
            if j < n and text[j] == "'" and upper in _STRING_PREFIXES:
                i = _skip_quoted(text, j, "'", backslash=mysql or upper == "E")
                out.append("?")
            elif upper == "U" and text.startswith("&'", j):
                i = _skip_quoted(text, j + 1, "'", backslash=False)
                out.append("?")
            elif upper == "U" and text.startswith('&"', j):
                end = _skip_quoted(text, j + 1, '"', backslash=False)
                out.append(text[i:end] if _closed(text, j + 1, end) else "?")
                i = end
            elif upper in _LITERAL_WORDS:
                out.append("?")
                i = j
            else:
                out.append(word)
                i = j
        elif ch in ":@" and i + 1 < n and (_ident_start(text[i + 1]) or text[i + 1] == "@"):
            j = i + 1  # a named placeholder (:name, @p1) or a session variable (@@x)
            while j < n and (_ident_part(text[j]) or text[j] == "@"):
                j += 1
            out.append(text[i:j])
            i = j
        else:
            out.append(ch)
            i += 1
    while out and out[-1] == " ":
        out.pop()
    if out and out[0] == " ":
        out.pop(0)
    return out


def _skip_number(text: str, i: int) -> int:
    n = len(text)
    j = i
    if text.startswith(("0x", "0X"), i):
        j = i + 2
        while j < n and text[j] in "0123456789abcdefABCDEF_":
            j += 1
        return j
    while j < n and (text[j].isdigit() or text[j] in "._"):
        j += 1
    if j < n and text[j] in "eE":
        k = j + 1
        if k < n and text[k] in "+-":
            k += 1
        if k < n and text[k].isdigit():
            j = k
            while j < n and text[j].isdigit():
                j += 1
    # 123abc is not an identifier: the letters stay glued to the number (a cut literal)
    while j < n and _ident_part(text[j]):
        j += 1
    return j


def sanitize(statement: str, system: str = "", limit: int = MAX_STATEMENT_BYTES) -> str:
    """``statement`` with its literals replaced by ``?`` and comments dropped, at most
    ``limit`` UTF-8 bytes. ``system`` is the database (``mysql`` changes the quoting
    rules; anything else is standard SQL as PostgreSQL reads it)."""
    pieces: list[str] = []
    size = 0
    for token in _tokens(statement, system):
        encoded = len(token.encode("utf-8", "replace"))
        if size + encoded > limit:
            break
        pieces.append(token)
        size += encoded
    return "".join(pieces).rstrip()


def sql_operation(sanitized: str) -> str:
    """The statement's operation, upper case: its first word (SELECT, INSERT, BEGIN...);
    for WITH, the first data statement at the outer level. "" if there is no word."""
    words = _tokens(sanitized, "")
    first = next((w for w in words if w[:1].isalpha()), "")
    upper = first.upper()
    if upper != "WITH":
        return upper
    depth = 0
    for word in words:
        if word == "(":
            depth += 1
        elif word == ")":
            depth -= 1
        elif depth == 0 and word.upper() in _OPERATIONS:
            return word.upper()
    return upper
