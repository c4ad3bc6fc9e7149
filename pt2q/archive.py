"""Vetting a torch.export archive before torch reads it: `pt2q.load` never runs code from a file.

torch.export.load (torch 2.13) runs code from an archive in several ways, and each is closed here:
- it unpickles with `weights_only=False` (tensor-subclass payloads, opaque constants, sample inputs that
  fail the weights-only unpickler, the legacy format) and dlopens AOTInductor libraries;
- it hands every symbolic-shape `expr_str` to `sympy.sympify`, which evaluates Python;
- `ExportedProgram.module()` `exec`s the strings in `guards_code`;
- a node's `target` is resolved by `getattr` from the `torch`, `operator` and `math` modules, so
  `torch.os.system` is a valid target that runs when the graph runs;
- tree specs name Python types, resolved through pytree's registry.
Expressions are parsed with `ast` (which runs nothing) and accepted only when every piece is on an
allow-list; targets and type names must be on one too. Zip members must have plain relative names and a
bounded size. Anything else is refused with a Pt2qError that names the member and the field.
"""
from __future__ import annotations

import ast
import io
import json
import re
import zipfile

import torch

from .errors import Pt2qError

# A member may expand at most this much (pt2q.save stores members uncompressed), and the whole archive
# to at most this many bytes: more is a zip bomb, not a model.
MAX_COMPRESSION_RATIO = 200
MAX_UNCOMPRESSED_BYTES = 64 * 2 ** 30

# Operator namespaces a pt2q graph may call (`torch.ops.<namespace>.<op>.<overload>`).
# pt2q_gaudi2 / pt2q_gaudi3: the Habana lowering's CPU reference ops; hpu: the same ops, Habana's own.
ALLOWED_OP_NAMESPACES = frozenset({"aten", "prims", "quantized_decomposed", "higher_order", "onednn",
                                   "quantized", "torchao", "pt2q", "pt2q_gaudi2", "pt2q_gaudi3", "hpu"})
_OP_TARGET = re.compile(r"torch\.ops\.(\w+)\.\w+(\.\w+)?")
# Python-level targets torch.export emits for symbolic size arithmetic.
ALLOWED_PLAIN_TARGETS = frozenset(
    [f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "pow",
                                      "neg", "pos", "abs", "eq", "ne", "lt", "le", "gt", "ge", "and_",
                                      "or_", "xor", "not_", "invert", "lshift", "rshift")]
    + [f"math.{name}" for name in ("ceil", "floor", "trunc", "sqrt", "exp", "log", "pow")]
    + [f"torch.{name}" for name in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite",
                                    "sym_sqrt", "sym_sum", "_sym_sqrt")]
)

# Functions a symbolic-shape expression may call: sympy's constructors and torch's sympy functions.
_SYMPY_FUNCTIONS = frozenset({
    "Symbol", "Integer", "Float", "Rational", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "And", "Or", "Not", "Mul", "Add", "Pow", "Mod", "floor", "ceiling", "sqrt", "oo", "zoo", "nan",
    "true", "false", "S", "pi", "E",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv",
    "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity", "OpaqueUnaryFn_sqrt", "OpaqueUnaryFn_exp", "OpaqueUnaryFn_log",
})
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")  # s0, u3, zuf0, ...: torch's shape symbols
_SYMBOL_KEYWORDS = frozenset({"positive", "integer", "real", "nonnegative", "finite", "negative"})
_EXPRESSION_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.BoolOp, ast.Compare, ast.Call, ast.Name,
                     ast.Constant, ast.Load, ast.keyword, ast.operator, ast.unaryop, ast.boolop, ast.cmpop)

# Guards (`guards_code`) may only compare sizes of the inputs: L['x'].size()[0] >= 2 and the like.
_GUARD_ATTRIBUTES = frozenset({"size", "shape", "stride", "dim", "numel", "storage_offset"})
_GUARD_NAMES = frozenset({"L", "True", "False", "None"})
_GUARD_NODES = _EXPRESSION_NODES + (ast.Subscript, ast.Attribute, ast.Tuple, ast.Slice)

# Tree-spec type names: what pytree has registered by imports pt2q itself trusts, plus the output
# containers of Hugging Face models, registered at load by importing their (allow-listed) module.
ALLOWED_TYPE_MODULES = ("transformers.modeling_outputs",)


def _refuse(where: str, why: str):
    raise Pt2qError(f"{where}: {why}; refusing to load it (it could execute code). "
                    "Only load files written by pt2q.save()")


def check_expression(text: str, where: str) -> None:
    """A symbolic-shape expression as torch serializes it (`Symbol('s0', positive=True, integer=True) + 1`):
    arithmetic, comparisons and allow-listed functions of shape symbols and numbers, nothing else."""
    _check_ast(text, where, _EXPRESSION_NODES, names=_SYMPY_FUNCTIONS, attributes=frozenset())


def check_guard(text: str, where: str) -> None:
    """An export guard: comparisons of the inputs' sizes (`L['x'].size()[0] <= 64`)."""
    _check_ast(text, where, _GUARD_NODES, names=_GUARD_NAMES | _SYMPY_FUNCTIONS, attributes=_GUARD_ATTRIBUTES)


def _check_ast(text: str, where: str, allowed_nodes: tuple, *, names: frozenset, attributes: frozenset) -> None:
    if not isinstance(text, str) or len(text) > 10_000:
        _refuse(where, "an expression that is not a short string")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        _refuse(where, f"the expression {text[:80]!r} is not valid")
    for node in ast.walk(tree):
        if not isinstance(node, allowed_nodes):
            _refuse(where, f"the expression {text[:80]!r} contains {type(node).__name__}")
        if isinstance(node, ast.Name) and node.id not in names and not _SYMBOL_NAME.fullmatch(node.id):
            _refuse(where, f"the expression {text[:80]!r} names {node.id!r}")
        if isinstance(node, ast.Attribute) and node.attr not in attributes:
            _refuse(where, f"the expression {text[:80]!r} reads attribute {node.attr!r}")
        if isinstance(node, ast.Constant) and not isinstance(node.value, (int, float, bool, str, type(None))):
            _refuse(where, f"the expression {text[:80]!r} holds a {type(node.value).__name__} constant")
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not re.fullmatch(r"\w{1,64}", node.value):
            _refuse(where, f"the expression {text[:80]!r} holds the string {node.value[:40]!r}")
        if isinstance(node, ast.Call):
            callee = node.func
            if isinstance(callee, ast.Name) and callee.id in names:
                pass
            elif isinstance(callee, ast.Attribute) and callee.attr in attributes:
                pass
            else:
                _refuse(where, f"the expression {text[:80]!r} makes a call that is not allowed")
            for keyword in node.keywords:
                if keyword.arg not in _SYMBOL_KEYWORDS or not isinstance(keyword.value, ast.Constant):
                    _refuse(where, f"the expression {text[:80]!r} passes keyword {keyword.arg!r}")


def check_target(target: str, where: str) -> None:
    if target in ALLOWED_PLAIN_TARGETS:
        return
    match = _OP_TARGET.fullmatch(target)
    if match is None or match.group(1) not in ALLOWED_OP_NAMESPACES:
        _refuse(where, f"it calls {target!r}, which is not an operator pt2q graphs use")


def _type_names(spec) -> list[str]:
    names = []
    stack = [spec]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                names.append(node["type"])
            stack.extend(node.get("children_spec") or [])
        elif isinstance(node, list):
            stack.extend(node)
    return names


def check_tree_spec(serialized: str, where: str, allowed_types: set[str]) -> None:
    try:
        spec = json.loads(serialized)
    except (TypeError, ValueError):
        _refuse(where, "a tree spec that is not JSON")
    for name in _type_names(spec):
        if name not in allowed_types:
            _refuse(where, f"its tree spec names the type {name!r}, which pt2q does not know; a Hugging Face "
                           "output type is known only when recorded by pt2q.save")


def registered_type_names() -> set[str]:
    from torch.utils._pytree import SERIALIZED_TYPE_TO_PYTHON_TYPE

    return set(SERIALIZED_TYPE_TO_PYTHON_TYPE)


def register_output_types(type_names: list[str], where: str) -> None:
    """Import the modules of the recorded output container types (allow-listed modules only), which
    registers them with pytree."""
    import importlib

    for name in type_names:
        module, _, _ = name.rpartition(".")
        if module not in ALLOWED_TYPE_MODULES:
            _refuse(where, f"it records the output type {name!r} from a module pt2q does not import")
        try:
            importlib.import_module(module)
        except ImportError as error:
            raise Pt2qError(f"{where}: the model's outputs are {name}, which needs {module!r}: "
                            f"install it ({error})") from error


def _check_zip(data: bytes, where: str) -> zipfile.ZipFile:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, ValueError) as error:
        _refuse(where, f"not a torch.export archive ({type(error).__name__}: {error})")
    total = 0
    for info in members:
        name = info.filename
        if name.startswith(("/", "\\")) or "\\" in name or ".." in name.split("/") or ":" in name.split("/")[0]:
            _refuse(where, f"member {name!r} has a path that leaves the archive")
        if info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1) + 2 ** 20:
            _refuse(where, f"member {name!r} expands {info.file_size} bytes from {info.compress_size} (zip bomb)")
        total += info.file_size
    if total > MAX_UNCOMPRESSED_BYTES:
        _refuse(where, f"it expands to {total} bytes, over the {MAX_UNCOMPRESSED_BYTES} pt2q loads")
    return archive


# Every member pt2q.save writes, relative to the archive's root folder.
_WRITTEN_BY_SAVE = re.compile(r"archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                              r"data/(weights|constants)/[\w.]+|data/sample_inputs/\w+\.pt|models/\w+\.json|"
                              r"extra/[\w.]+")


def _check_members(data: bytes, where: str) -> None:
    """Only members `save` writes, and no pickled object among them: weights are raw bytes, sample
    inputs plain tensors."""
    from torch.export.pt2_archive import constants as pt2
    from torch.export.pt2_archive._package import PT2ArchiveReader

    try:
        reader = PT2ArchiveReader(io.BytesIO(data))
        names = reader.get_file_names()
    except Exception as error:  # noqa: BLE001 - any failure to read it is a refusal, with the reason
        _refuse(where, f"not a torch.export archive ({type(error).__name__}: {error})")
    if pt2.ARCHIVE_VERSION_PATH not in names:
        _refuse(where, "legacy (pre-PT2-archive) torch.export format")
    for name in names:
        if name.startswith(pt2.AOTINDUCTOR_DIR):
            _refuse(where, f"contains an AOTInductor library ({name})")
        if name.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and name.endswith(".pt"):
            _refuse(where, f"contains pickled weights ({name})")
        if name.startswith((pt2.WEIGHTS_DIR, pt2.CONSTANTS_DIR)) and name.endswith("_config.json"):
            for fqn, meta in json.loads(reader.read_string(name)).get("config", {}).items():
                if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(
                        (pt2.WEIGHT_FILENAME_PREFIX, pt2.TENSOR_CONSTANT_FILENAME_PREFIX)):
                    _refuse(where, f"{fqn!r} is stored as a pickled object ({name})")
        if name.startswith(pt2.SAMPLE_INPUTS_DIR):
            try:
                torch.load(io.BytesIO(reader.read_bytes(name)), weights_only=True)
            except Exception as error:  # noqa: BLE001
                _refuse(where, f"its sample inputs ({name}) are not plain tensors: {type(error).__name__}")
        if not _WRITTEN_BY_SAVE.fullmatch(name) or name.rpartition("/")[2].startswith(
                (pt2.CUSTOM_OBJ_FILENAME_PREFIX, pt2.OPAQUE_OBJ_FILENAME_PREFIX)):
            _refuse(where, f"contains {name!r}, which pt2q.save never writes")


def _walk(value, visit, path: str) -> None:
    """Call visit(key, value, path) for every key of every dict below `value`."""
    stack = [(value, path)]
    while stack:
        node, where = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                child_path = f"{where}.{key}" if where else str(key)
                visit(key, child, child_path)
                if isinstance(child, (dict, list)):
                    stack.append((child, child_path))
        elif isinstance(node, list):
            stack.extend((child, f"{where}[{i}]") for i, child in enumerate(node))


def _check_model_json(text: str, member: str, where: str, allowed_types: set[str]) -> None:
    try:
        model = json.loads(text)
    except ValueError:
        _refuse(where, f"{member} is not JSON")

    def visit(key, value, path):
        at = f"{where}: {member}, field {path}"
        if key == "expr_str":
            check_expression(value, at)
        elif key == "target" and isinstance(value, str):
            check_target(value, at)
        elif key in ("in_spec", "out_spec") and isinstance(value, str):
            check_tree_spec(value, at, allowed_types)
        elif key == "guards_code":
            for index, guard in enumerate(value or []):
                check_guard(guard, f"{at}[{index}]")
        elif key in ("as_custom_obj", "custom_obj_values") and value:
            _refuse(at, "it holds a custom (scripted) object")

    _walk(model, visit, "")


def vet(data: bytes, where: str, output_types: list[str]) -> None:
    """Refuse (Pt2qError) an archive torch.export.load could run code from. `output_types`: the output
    container types pt2q.save recorded, registered here (allow-listed modules only) before the check."""
    archive = _check_zip(data, where)
    _check_members(data, where)
    register_output_types(output_types, where)
    allowed_types = registered_type_names()
    for info in archive.infolist():
        if info.filename.endswith(".json") and "/models/" in f"/{info.filename}":
            _check_model_json(archive.read(info).decode("utf-8", errors="replace"), info.filename, where,
                              allowed_types)
