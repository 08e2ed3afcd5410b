"""MarbleRun's Go text/template subset for manifest ``Files`` and ``Env`` values.

A hand-written lexer, parser and type checker turn a template (bytes) into closures once;
executing it against :class:`TemplateData` then costs a few microseconds. No eval, no Jinja.

    >>> t = parse_template(b"key={{ hex .MarbleRun.SealKey }}", FunctionSet.ENV)
    >>> t.execute(data)                                    # doctest: +SKIP
    b'key=00112233...'

Every problem raises :class:`marblekeep.errors.TemplateError` with "line L, column C: ...";
messages never contain secret values. See docs/templates.md for the language.

Modules: ``data`` (the values), ``lexer``, ``parser``, ``compiler`` (type check + closures +
encoding functions), ``engine`` (Template, parse_template, render).
"""

from marblekeep.templating.data import FunctionSet, ReservedSecret, TemplateData
from marblekeep.templating.engine import Template, parse_template, render

__all__ = ["FunctionSet", "ReservedSecret", "Template", "TemplateData", "parse_template", "render"]
