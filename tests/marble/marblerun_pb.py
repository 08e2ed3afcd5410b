"""MarbleRun's Marble API messages built with Google's ``protobuf`` package (an independent codec).

The classes come from a descriptor written here from the published schema (no generated code, no
protoc): ``rpc.ActivationReq``, ``rpc.ActivationResp``, ``rpc.Parameters``. Tests use them to
cross-check marblekeep's hand-written codec, and the gRPC tests use them as the client's messages.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _build() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="marblekeep_test_coordinator.proto", package="rpc", syntax="proto3"
    )
    req = fdp.message_type.add(name="ActivationReq")
    for name, number, kind in (
        ("Quote", 1, _F.TYPE_BYTES),
        ("CSR", 2, _F.TYPE_BYTES),
        ("MarbleType", 3, _F.TYPE_STRING),
        ("UUID", 4, _F.TYPE_STRING),
    ):
        req.field.add(name=name, number=number, type=kind, label=_F.LABEL_OPTIONAL)
    params = fdp.message_type.add(name="Parameters")
    for name, number in (("Files", 1), ("Env", 2)):
        entry = params.nested_type.add(name=f"{name}Entry")
        entry.options.map_entry = True
        entry.field.add(name="key", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
        entry.field.add(name="value", number=2, type=_F.TYPE_BYTES, label=_F.LABEL_OPTIONAL)
        params.field.add(
            name=name,
            number=number,
            type=_F.TYPE_MESSAGE,
            label=_F.LABEL_REPEATED,
            type_name=f".rpc.Parameters.{name}Entry",
        )
    params.field.add(name="Argv", number=3, type=_F.TYPE_STRING, label=_F.LABEL_REPEATED)
    resp = fdp.message_type.add(name="ActivationResp")
    resp.field.add(
        name="Parameters",
        number=1,
        type=_F.TYPE_MESSAGE,
        label=_F.LABEL_OPTIONAL,
        type_name=".rpc.Parameters",
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"rpc.{name}"))
        for name in ("ActivationReq", "ActivationResp", "Parameters")
    }


_CLASSES = _build()
PbActivationReq: Any = _CLASSES["ActivationReq"]
PbActivationResp: Any = _CLASSES["ActivationResp"]
PbParameters: Any = _CLASSES["Parameters"]
