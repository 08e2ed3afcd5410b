"""MarbleRun's Go text/template subset for manifest ``Files`` and ``Env`` values.

A hand-written lexer, parser and type checker turn a template (bytes) into closures once;
executing it against :class:`TemplateData` then costs a few microseconds. No eval, no Jinja.

    >>> from marblekeep.templating import FunctionSet, ReservedSecret, TemplateData, parse_template
    >>> ca = ReservedSecret(cert=b"certificate DER")
    >>> data = TemplateData(root_ca=ca, marble_cert=ca, coordinator_root=ca,
    ...                     coordinator_intermediate=ca, seal_key=bytes(range(32)),
    ...                     secrets={}, previous_secrets={})
    >>> t = parse_template(b"key={{ hex .MarbleRun.SealKey }}", FunctionSet.ENV)
    >>> t.execute(data)
    b'key=000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f'

``.Secrets`` maps names to anything shaped like :class:`SecretValue` (the manifest's ``Secret``
is one). Layering: templating imports nothing from :mod:`marblekeep.manifest`; the template dry
run, which needs both, lives above them (:mod:`marblekeep.manifest.dryrun`).

Every problem raises :class:`marblekeep.errors.TemplateError` with "line L, column C: ...";
messages never contain secret values. See docs/templates.md for the language.

Modules: ``data`` (the values), ``lexer``, ``parser``, ``compiler`` (type check + closures +
encoding functions), ``engine`` (Template, parse_template, render).
"""

from marblekeep.templating.data import FunctionSet, ReservedSecret, SecretValue, TemplateData
from marblekeep.templating.engine import RenderBudget, Template, parse_template, render, render_size

__all__ = [
    "FunctionSet",
    "RenderBudget",
    "ReservedSecret",
    "SecretValue",
    "Template",
    "TemplateData",
    "parse_template",
    "render",
    "render_size",
]
