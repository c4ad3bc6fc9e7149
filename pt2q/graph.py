"""Small helpers shared by passes, quantizers and backends: node metadata, constants, graph views."""
from __future__ import annotations

import networkx as nx
import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten

# Ops that only re-view their first argument: data flows through them unchanged.
VIEW_OPS = frozenset({
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints,
    aten.permute.default, aten.transpose.int, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.contiguous.default,
    aten.expand.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
})

# weighted op -> positions of the arguments that may be its constant weight; the last one is where the
# weight sits when the op is written as a layer (addmm: mat2; mm / matmul / bmm: the right operand)
WEIGHT_ARGUMENTS = {
    aten.linear.default: (1,), aten.conv1d.default: (1,), aten.conv2d.default: (1,), aten.conv3d.default: (1,),
    aten.convolution.default: (1,), aten.conv_transpose1d.default: (1,), aten.conv_transpose2d.input: (1,),
    aten.conv_transpose3d.input: (1,), aten.addmm.default: (1, 2), aten.mm.default: (0, 1),
    aten.matmul.default: (0, 1), aten.bmm.default: (0, 1), aten.baddbmm.default: (1, 2),
}


def tensor_meta(node) -> torch.Tensor | None:
    """The fake tensor export recorded for `node`'s output, or None when it is not a single tensor."""
    value = node.meta.get("val") if isinstance(node, Node) else None
    return value if isinstance(value, torch.Tensor) else None


def is_float_tensor(node) -> bool:
    value = tensor_meta(node)
    return value is not None and value.dtype.is_floating_point


def module_stack(node: Node) -> list[tuple[str, str]]:
    """(fully qualified module name, class path) of the modules enclosing `node`, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(str(fqn), cls if isinstance(cls, str) else f"{cls.__module__}.{cls.__qualname__}")
            for fqn, cls in stack.values()]


def module_fqn(node: Node) -> str:
    """Name of the innermost module that produced `node`, as in `model.named_modules()` ('' at top level)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def get_constant(gm: GraphModule, node) -> torch.Tensor | None:
    """The tensor behind a `get_attr` node (a parameter, buffer or constant), else None."""
    if not isinstance(node, Node) or node.op != "get_attr":
        return None
    value = gm
    for part in node.target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value if isinstance(value, torch.Tensor) else None


def add_constant(gm: GraphModule, name_hint: str, value: torch.Tensor) -> str:
    """Register `value` as a new buffer on `gm` under a free name derived from `name_hint`; returns it."""
    base = name_hint.replace(".", "_")
    name, suffix = base, 0
    while hasattr(gm, name):
        suffix += 1
        name = f"{base}_{suffix}"
    gm.register_buffer(name, value)
    return name


def to_networkx(graph: torch.fx.Graph) -> nx.DiGraph:
    """Directed data-flow graph of an FX graph: node names as vertices, `node` attribute holds the Node."""
    view = nx.DiGraph()
    for node in graph.nodes:
        view.add_node(node.name, node=node)
        for arg in node.all_input_nodes:
            view.add_edge(arg.name, node.name)
    return view


def own_tensors(module: torch.nn.Module) -> int:
    """Replace every parameter, buffer and plain tensor attribute below `module` by a copy, so that
    nothing it holds shares storage with anyone else's tensors (torch.export's module shares the
    user's). Tensors tied together (one object in two places) stay tied. Returns the number copied."""
    copies: dict[int, torch.Tensor] = {}

    def own(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in copies:
            copy = tensor.detach().clone()
            if isinstance(tensor, torch.nn.Parameter):
                copy = torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
            copies[id(tensor)] = copy
        return copies[id(tensor)]

    for submodule in module.modules():
        for table in (submodule._parameters, submodule._buffers):
            for name, tensor in list(table.items()):
                if tensor is not None:
                    table[name] = own(tensor)
        for name, value in list(vars(submodule).items()):
            if isinstance(value, torch.Tensor):
                submodule.__dict__[name] = own(value)
    return len(copies)


def drop_unused_attribute(gm: GraphModule, target: str) -> None:
    """Delete the parameter/buffer `target` from its owner when no get_attr node refers to it any more."""
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner_name, _, leaf = target.rpartition(".")
    owner = gm.get_submodule(owner_name) if owner_name else gm
    for table in (owner._parameters, owner._buffers):
        table.pop(leaf, None)
    if leaf in vars(owner):
        delattr(owner, leaf)
