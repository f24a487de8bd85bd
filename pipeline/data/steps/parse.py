"""Drop code that does not parse, with a real parser per language.

Python goes through the interpreter's own ``ast`` (so Python 2 files, which the corpus may hold, fail
and are dropped: the model should learn the Python that runs). JavaScript / TypeScript go through
tree-sitter grammars from their maintained wheels; a tree with ERROR or MISSING nodes is a syntax error.
Languages not listed in ``data.clean.parse_check_languages`` pass untouched.
"""

from __future__ import annotations

import ast
import importlib
import re
import warnings

from pipeline.data.steps.base import Filter

# tree-sitter grammar wheels per language: (module, function returning the language pointer).
TREE_SITTER_GRAMMARS = {
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
}
PY2_HINTS = [
    (re.compile(r"^\s*print\s+[\"'\w(]", re.M), "print statement"),
    (re.compile(r"^\s*except\s+[\w.]+\s*,\s*\w+\s*:", re.M), "'except X, e'"),
    (re.compile(r"^\s*exec\s+[\"'\w]", re.M), "exec statement"),
    (re.compile(r"\bur[\"']"), "ur'' literal"),
    (re.compile(r"^\s*raise\s+\w+\s*,", re.M), "'raise E, msg'"),
]


def python_error(source: str) -> str | None:
    """None when ``source`` parses as Python 3, else a one-line reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences etc. are warnings, not errors
            ast.parse(source)
        return None
    except SyntaxError as exc:
        where = f"line {exc.lineno}" if exc.lineno else "unknown line"
        msg = f"python: {exc.msg} at {where}"
        hints = [label for rx, label in PY2_HINTS if rx.search(source)]
        if hints:
            msg += f" (looks like Python 2: {', '.join(hints)})"
        return msg
    except (ValueError, RecursionError, MemoryError) as exc:  # NUL bytes, absurd nesting
        return f"python: {type(exc).__name__}: {exc}"[:300]


def _first_error(node):
    """The first ERROR or MISSING node in document order (the tree says only that there is one)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if n.is_error or n.is_missing:
            return n
        if n.has_error:
            stack.extend(reversed(n.children))
    return None


class SyntaxCheck(Filter):
    """Rejects documents of the checked languages that do not parse (reason ``syntax_error``)."""

    name = "syntax_error"

    def __init__(self, languages: list[str]):
        self.languages = frozenset(languages)
        unknown = self.languages - {"python"} - set(TREE_SITTER_GRAMMARS)
        if unknown:
            raise ValueError(f"data.clean.parse_check_languages: no parser for {sorted(unknown)} "
                             f"(supported: python, {', '.join(sorted(TREE_SITTER_GRAMMARS))})")
        for lang in self.languages - {"python"}:
            self._grammar(lang)  # fail at start-up, not in a worker, when a grammar wheel is missing
        self._parsers: dict = {}

    def __getstate__(self):  # tree-sitter parsers cannot be pickled; each worker builds its own
        return {"languages": self.languages, "_parsers": {}}

    @staticmethod
    def _grammar(lang: str):
        module, fn = TREE_SITTER_GRAMMARS[lang]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise ValueError(f"data.clean.parse_check_languages lists {lang!r} but the {module} wheel is not "
                             f"installed (pip install {module.replace('_', '-')})") from None
        import tree_sitter

        return tree_sitter.Language(getattr(mod, fn)())

    def _parser(self, lang: str):
        if lang not in self._parsers:
            import tree_sitter

            self._parsers[lang] = tree_sitter.Parser(self._grammar(lang))
        return self._parsers[lang]

    def tree_sitter_error(self, lang: str, source: str) -> str | None:
        tree = self._parser(lang).parse(source.encode("utf-8"))
        if not tree.root_node.has_error:
            return None
        bad = _first_error(tree.root_node)
        if bad is None:
            return f"{lang}: parse error"
        kind = f"missing {bad.type!r}" if bad.is_missing else "unexpected input"
        row, col = bad.start_point
        return f"{lang}: {kind} at line {row + 1}, column {col + 1}"

    def filter(self, doc: dict):
        lang = doc["lang"]
        if lang not in self.languages:
            return True
        err = python_error(doc["content"]) if lang == "python" else self.tree_sitter_error(lang, doc["content"])
        return True if err is None else (False, err)
