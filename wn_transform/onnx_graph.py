"""Pure helpers on ONNX protos: initializer names, graph statistics, saving.

No torch exporter runs here; :mod:`wn_transform.export` calls these on the graph an exporter
made.  ``restore_initializer_names`` gives weights the exporter named after an op
(``val_12``, ``onnx::Conv_12``) their state-dict name back, by exact value.
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import torch

__all__ = ["TORCH_TO_ONNX_DTYPE", "alias_key", "declare_dynamic_outputs", "graph_stats", "restore_initializer_names", "save",
           "value_shape"]

TORCH_TO_ONNX_DTYPE = {
    torch.float32: onnx.TensorProto.FLOAT, torch.float16: onnx.TensorProto.FLOAT16,
    torch.bfloat16: onnx.TensorProto.BFLOAT16, torch.float64: onnx.TensorProto.DOUBLE,
    torch.int8: onnx.TensorProto.INT8, torch.uint8: onnx.TensorProto.UINT8,
    torch.int16: onnx.TensorProto.INT16, torch.int32: onnx.TensorProto.INT32,
    torch.int64: onnx.TensorProto.INT64, torch.bool: onnx.TensorProto.BOOL,
}


def restore_initializer_names(proto: onnx.ModelProto, state: Mapping[str, torch.Tensor],
                               ) -> tuple[dict[str, str], list[str]]:
    """Rename initializers the exporter named after an op back to their state-dict name.

    An initializer is renamed to ``name`` when its dtype, shape and bytes equal those of the
    state-dict entry ``name``, no other state-dict entry holds the same value, no other
    initializer holds it either, and ``name`` is not already a value name in the model.
    Returns the renames (old -> new) and the floating-point state-dict entries still without an
    initializer (tied ones once).
    """
    graph = proto.graph
    init_names = {init.name for init in graph.initializer}
    missing = [name for name, t in state.items() if name not in init_names and t.numel() > 0]
    renamed: dict[str, str] = {}
    if missing:
        wanted: dict[tuple, list[str]] = collections.defaultdict(list)
        shapes = set()
        for name in missing:
            key = _tensor_key(state[name])
            if key is not None:
                wanted[key].append(name)
                shapes.add(key[:2])
        # a value that a present entry holds too is ambiguous
        for name, tensor in state.items():
            if name in init_names and (TORCH_TO_ONNX_DTYPE.get(tensor.dtype), tuple(tensor.shape)) in shapes:
                key = _tensor_key(tensor)
                if key in wanted:
                    wanted[key].append(name)
        found: dict[tuple, list[str]] = collections.defaultdict(list)
        for init in graph.initializer:
            if init.name in state or (init.data_type, tuple(init.dims)) not in shapes:
                continue
            found[_initializer_key(init)].append(init.name)
        taken = _value_names(graph)
        mapping = {}
        for key, names in wanted.items():
            if len(names) == 1 and len(found.get(key, ())) == 1 and names[0] not in taken:
                mapping[found[key][0]] = names[0]
        if mapping:
            _rename_values(graph, mapping)
            renamed = mapping
    init_names = {init.name for init in graph.initializer}
    kept = {alias_key(t) for name, t in state.items() if name in init_names}
    unnamed = [name for name, t in state.items()  # (not a counter or a flag: num_batches_tracked is in no graph)
               if name not in init_names and t.numel() > 0 and t.is_floating_point() and alias_key(t) not in kept]
    return renamed, unnamed


def alias_key(tensor: torch.Tensor) -> tuple:
    """Where a tensor's values live: tied weights (one Parameter, two names) share it."""
    return tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride()


def _tensor_key(tensor: torch.Tensor) -> tuple | None:
    dtype = TORCH_TO_ONNX_DTYPE.get(tensor.dtype)
    if dtype is None:
        return None
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    return dtype, tuple(tensor.shape), hashlib.sha256(data).hexdigest()


def _initializer_key(init: onnx.TensorProto) -> tuple:
    array = onnx.numpy_helper.to_array(init)
    data = np.ascontiguousarray(array).tobytes()
    return init.data_type, tuple(init.dims), hashlib.sha256(data).hexdigest()


def _value_names(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names.update(init.name for init in graph.initializer)
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                names |= _value_names(sub)
    return names


def _rename_values(graph: onnx.GraphProto, mapping: Mapping[str, str]) -> None:
    """Rename values everywhere they are named: initializers, nodes, subgraphs, graph I/O."""
    for init in graph.initializer:
        if init.name in mapping:
            init.name = mapping[init.name]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name in mapping:
            value.name = mapping[value.name]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in mapping:
                node.input[i] = mapping[name]
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                _rename_values(sub, mapping)


def graph_stats(proto: onnx.ModelProto) -> dict[str, Any]:
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    counts = collections.Counter(node.op_type for node in graph.node)
    nbytes = 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.STRING:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
            nbytes += itemsize * math.prod(init.dims)
    return {
        "opset": opset,
        "node_counts": dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))),
        "initializer_count": len(graph.initializer),
        "initializer_bytes": nbytes,
        "inputs": {v.name: value_shape(v) for v in graph.input},
        "outputs": {v.name: value_shape(v) for v in graph.output},
    }


def value_shape(value: onnx.ValueInfoProto) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else "?")
            for d in dims]


def output_shapes(file: str) -> dict[str, list[int | str]]:
    """``file``'s declared output shapes (:func:`value_shape`), its weights left unread."""
    return {v.name: value_shape(v) for v in onnx.load_model(file, load_external_data=False).graph.output}


def declare_dynamic_outputs(file: str, axes: dict[str, list[int]]) -> dict[str, list[str]]:
    """Rewrite ``file``'s declared output shapes: each listed axis of a fixed size becomes a named
    dynamic one (``<output>_dim<axis>``); weights stored beside the file stay where they are.
    Returns, per output, the axes as ``"axis N (was S)"``."""
    proto = onnx.load_model(file, load_external_data=False)
    changed: dict[str, list[str]] = {}
    sizes: set[int] = set()
    for output in proto.graph.output:
        for axis in axes.get(output.name, ()):
            dim = output.type.tensor_type.shape.dim[axis]
            changed.setdefault(output.name, []).append(f"axis {axis} (was {dim.dim_value})")
            sizes.add(dim.dim_value)
            dim.Clear()
            dim.dim_param = f"{output.name}_dim{axis}"
    # The intermediate shapes that carry those sizes were declared alike (onnxruntime would infer the
    # output's from them): drop those annotations, which are optional, and let it infer them.
    kept = [info for info in proto.graph.value_info
            if not any(dim.HasField("dim_value") and dim.dim_value in sizes for dim in info.type.tensor_type.shape.dim)]
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    onnx.save_model(proto, file)
    return changed


def save(proto: onnx.ModelProto, file: str, data_name: str | None) -> None:
    """Write ``proto`` to ``file``: self-contained, or with every initializer of 1 KiB or more (the
    weights) in ``data_name`` beside it, written afresh (an empty file where there is none).
    Smaller ones stay inside: onnxruntime's shape inference cannot read an op's constant operands
    (a ReduceMean's axes, a Reshape's shape, a Resize's scales) from external data."""
    if data_name is None:
        onnx.save_model(proto, file)
        return
    data_file = os.path.join(os.path.dirname(file), data_name)
    if os.path.exists(data_file):
        os.remove(data_file)  # onnx appends to it: a second export's weights would follow the first's
    for tensor in _initializers(proto.graph):
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= _INLINE_BYTES:
            onnx.external_data_helper.set_external_data(tensor, data_name)
    onnx.save_model(proto, file)  # (writes the tensors marked external to data_name, beside file)
    open(data_file, "ab").close()


_INLINE_BYTES = 1024  # onnx's own default threshold for external data


def _initializers(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """The initializers of ``graph`` and of the subgraphs its nodes hold (an If's branches, a Loop's body)."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                yield from _initializers(sub)
