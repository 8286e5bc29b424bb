"""TFLite Micro: a .tflite that TFLite Micro's interpreter loads and runs, checked and verified in that interpreter,
with the C/C++ sources an MCU firmware compiles next to it.

Conversion is tflite_export's (PT2E int8 with litert-torch's quantizer, as tflite-int8-static); then the
flatbuffer is edited for TFLite Micro and checked against its op set (``edgepkd.compress.tflm``):
  * every CONCATENATION of more than 10 inputs (TFLite Micro's kMaxInputNum) becomes a tree of concatenations of
    at most 10: the converter folds the scan's concat tree (models/scan.py ``_concat``) back into one L-input op;
  * an op TFLite Micro lacks is a one-line error naming it and the module its output came from (read from the
    converter's tensor names, before they are shortened).
Verification runs in TFLite Micro's own interpreter at the exact arena (the smallest that allocates and invokes,
found by bisection: ``compress/tflm.py``'s TFLMModel, opened by the format's ``open_runtime``). Once the
artifact passes, ``companions`` writes the firmware sources next to it:

    <model>_data.h / <model>_data.cc   the model as an ``alignas(16) const unsigned char`` array and its length,
                                       the measured arena size, input and output scale / zero point, the labels
    <model>_main.cc                    a minimal program: MicroMutableOpResolver with exactly the model's ops,
                                       MicroInterpreter, AllocateTensors, Invoke, the top class
"""

from __future__ import annotations

import re
from pathlib import Path

from edgepkd.compress import tflite_export
from edgepkd.compress._native import quiet_native
from edgepkd.errors import EdgepkdError
from edgepkd.compress import tflm

read_metadata = tflite_export.read_metadata


class UnsupportedOp(EdgepkdError):
    """The graph holds an op TFLite Micro lacks."""

    exit_code = 1


def export(model, example, path: Path, target, calibration, metadata: dict) -> None:
    """Convert as tflite_export does, split oversized concatenations, check the ops against TFLite Micro's, then
    shorten the tensor names and embed the metadata."""
    from ai_edge_litert.tools import flatbuffer_utils

    tflm.runtime()                                   # a missing tflite-micro is one line before a slow conversion
    with quiet_native():
        tflite_export._export(model, example, path, target, calibration)
    flat = flatbuffer_utils.read_model(str(path))
    split_concatenations(flat, tflm.MAX_CONCAT_INPUTS)
    check_ops(flat, metadata.get("model", path.stem))
    tflite_export._slim_tensors(flat)
    tflite_export._set_metadata(flat, metadata)
    flatbuffer_utils.write_model(flat, str(path))


def _builtin_names() -> dict[int, str]:
    from ai_edge_litert import schema_py_generated as schema

    return {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}


def _module_of(name: str) -> str | None:
    """The module a converter tensor name comes from: 'edgepkd.models.mamba.MambaStudent/torch.nn.modules.linear.
    Linear_head;3' -> 'MambaStudent.head'; 'pkg.Soft;10' -> 'Soft' (the model's own forward); None for graph
    inputs and outputs ('serving_default_...'), whose names carry no module."""
    path = name.split(";")[0].split("/")
    if "." not in path[0]:
        return None
    attrs = [seg.rsplit(".", 1)[-1].split("_", 1)[1] for seg in path[1:] if "_" in seg.rsplit(".", 1)[-1]]
    return ".".join([path[0].rsplit(".", 1)[-1], *attrs])


def check_ops(model, label: str) -> None:
    """A one-line UnsupportedOp for the first op TFLite Micro lacks (or a CONCATENATION it cannot take), naming
    the module whose output it computes."""
    names = _builtin_names()
    for sub in model.subgraphs:
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            name = names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")
            if name == "CUSTOM":
                name = f"CUSTOM:{(code.customCode or b'').decode() if isinstance(code.customCode, bytes) else code.customCode}"
            too_wide = name == "CONCATENATION" and len(op.inputs) > tflm.MAX_CONCAT_INPUTS
            if name in tflm.TFLM_OPS and not too_wide:
                continue
            tensors = [*(op.outputs if op.outputs is not None else []), *(op.inputs if op.inputs is not None else [])]
            names_seen = [sub.tensors[t].name for t in tensors if t >= 0]
            module = next((m for m in (_module_of(n.decode() if isinstance(n, bytes) else str(n))
                                       for n in names_seen) if m), "unknown")
            what = (f"CONCATENATION of {len(op.inputs)} inputs (TFLite Micro takes at most "
                    f"{tflm.MAX_CONCAT_INPUTS})" if too_wide else f"op {name}, which TFLite Micro does not have")
            raise UnsupportedOp(f"{label}: the graph has {what}, from module {module}; express it with TFLite "
                                f"Micro's ops ({len(tflm.TFLM_OPS)} builtins, edgepkd/compress/tflm.py TFLM_OPS)")


def split_concatenations(model, max_inputs: int) -> int:
    """Every CONCATENATION of more than ``max_inputs`` inputs becomes a tree of concatenations of at most
    ``max_inputs`` each (same axis; the intermediate tensors take the output's type and quantization, the fused
    activation stays on the last one). Returns how many ops were split."""
    import copy

    from ai_edge_litert import schema_py_generated as schema

    names = _builtin_names()
    split = 0
    for sub in model.subgraphs:
        rebuilt = []
        for op in sub.operators:
            code = model.operatorCodes[op.opcodeIndex]
            if names.get(max(code.builtinCode, code.deprecatedBuiltinCode)) != "CONCATENATION" or \
                    len(op.inputs) <= max_inputs:
                rebuilt.append(op)
                continue
            split += 1
            out = sub.tensors[op.outputs[0]]
            axis = op.builtinOptions.axis % len(out.shape)
            parts = list(op.inputs)
            while len(parts) > max_inputs:
                grouped = []
                for i in range(0, len(parts), max_inputs):
                    group = parts[i:i + max_inputs]
                    if len(group) == 1:
                        grouped.append(group[0])
                        continue
                    t = schema.TensorT()
                    t.shape = list(out.shape)
                    t.shape[axis] = int(sum(sub.tensors[g].shape[axis] for g in group))
                    t.type, t.buffer = out.type, 0 if model.buffers[0].data is None else _empty_buffer(model)
                    t.name = f"{out.name.decode() if isinstance(out.name, bytes) else out.name}/concat{len(sub.tensors)}"
                    t.quantization = copy.deepcopy(out.quantization)
                    sub.tensors.append(t)
                    inner = schema.OperatorT()
                    inner.opcodeIndex, inner.inputs, inner.outputs = op.opcodeIndex, group, [len(sub.tensors) - 1]
                    inner.builtinOptionsType = op.builtinOptionsType
                    inner.builtinOptions = schema.ConcatenationOptionsT()
                    inner.builtinOptions.axis = axis
                    inner.builtinOptions.fusedActivationFunction = schema.ActivationFunctionType.NONE
                    rebuilt.append(inner)                                # before its consumer: topological
                    grouped.append(len(sub.tensors) - 1)
                parts = grouped
            op.inputs = parts
            rebuilt.append(op)
        sub.operators = rebuilt
    return split


def _empty_buffer(model) -> int:
    from ai_edge_litert import schema_py_generated as schema

    for i, b in enumerate(model.buffers):
        if b.data is None and b.offset in (0, None) and b.size in (0, None):
            return i
    model.buffers.append(schema.BufferT())
    return len(model.buffers) - 1


# ------------------------------------------------------------------------------------------ firmware sources
def _ident(stem: str) -> str:
    ident = re.sub(r"\W", "_", stem)
    return ident if not ident[0].isdigit() else f"m_{ident}"


def _c_string(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def firmware_sources(blob: bytes, stem: str, entry: dict, arena: int, ops: list[str]) -> dict[str, str]:
    """{file name: text} of the C/C++ sources for the model ``blob`` named ``stem`` (see the module docstring)."""
    name = _ident(stem)
    guard = f"EDGEPKD_{name.upper()}_DATA_H_"
    inp, out = entry.get("input", {}), entry.get("output", {})
    iq, oq = inp.get("quantization") or {}, out.get("quantization") or {}
    labels = [str(c) for c in entry.get("classes", [])]
    pre = entry.get("preprocessing", {})
    origin = (f"// Generated by edgepkd export (target {entry.get('target')}) from {stem}.tflite: model "
              f"{entry.get('model')}, {len(blob):,} bytes, sha256 {entry.get('sha256', '')[:16]}...\n")
    header = origin + f"""// Input {inp.get('dtype')} {inp.get('shape')}: x = (pixel / 255 - mean) / std with mean
// {pre.get('mean')}, std {pre.get('std')}, then q = round(x / input_scale) + input_zero_point.
#ifndef {guard}
#define {guard}

#include <cstddef>
#include <cstdint>

extern const unsigned char {name}_model[];          // the .tflite flatbuffer, 16-byte aligned
extern const unsigned int {name}_model_len;
// Measured: the smallest arena TFLite Micro's interpreter (host build, reference kernels) allocates and
// invokes this model in; CMSIS-NN kernels may need a few scratch bytes more.
constexpr size_t {name}_arena_size = {arena};
constexpr float {name}_input_scale = {float(iq.get('scale', 1.0))!r}f;
constexpr int {name}_input_zero_point = {int(iq.get('zero_point', 0))};
constexpr float {name}_output_scale = {float(oq.get('scale', 1.0))!r}f;
constexpr int {name}_output_zero_point = {int(oq.get('zero_point', 0))};
constexpr int {name}_num_classes = {len(labels)};
extern const char* const {name}_labels[{len(labels)}];

#endif  // {guard}
"""
    rows = [", ".join(f"0x{b:02x}" for b in blob[i:i + 16]) for i in range(0, len(blob), 16)]
    data = origin + f"""#include "{stem}_data.h"

alignas(16) const unsigned char {name}_model[] = {{
  {(',' + chr(10) + '  ').join(rows)}
}};
const unsigned int {name}_model_len = {len(blob)};
const char* const {name}_labels[{len(labels)}] = {{{', '.join(_c_string(c) for c in labels)}}};
"""
    quantized = inp.get("dtype") == "int8"
    fill = (f"  for (size_t i = 0; i < input->bytes; ++i) input->data.int8[i] = {name}_input_zero_point;"
            if quantized else "  for (size_t i = 0; i < input->bytes / sizeof(float); ++i) input->data.f[i] = 0.0f;")
    score = ("(output->data.int8[k] - {n}_output_zero_point) * {n}_output_scale".format(n=name)
             if out.get("dtype") == "int8" else "output->data.f[k]")
    adds = "\n".join(f"  if (resolver.{tflm.TFLM_OPS[op]}() != kTfLiteOk) return 1;" for op in ops)
    main = origin + f"""// A minimal TFLite Micro program: register exactly the model's {len(ops)} ops, allocate, invoke on a blank
// image (every input at the zero point: 0 after normalisation), print the top class.
#include "{stem}_data.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {{
alignas(16) uint8_t tensor_arena[{name}_arena_size];
}}  // namespace

int main() {{
  const tflite::Model* model = tflite::GetModel({name}_model);
  if (model->version() != TFLITE_SCHEMA_VERSION) return 1;
  static tflite::MicroMutableOpResolver<{len(ops)}> resolver;
{adds}
  static tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, {name}_arena_size);
  if (interpreter.AllocateTensors() != kTfLiteOk) return 1;
  TfLiteTensor* input = interpreter.input(0);
{fill}
  if (interpreter.Invoke() != kTfLiteOk) return 1;
  TfLiteTensor* output = interpreter.output(0);
  int best = 0;
  float best_score = -1e30f;
  for (int k = 0; k < {name}_num_classes; ++k) {{
    const float s = {score};
    if (s > best_score) {{ best = k; best_score = s; }}
  }}
  MicroPrintf("class %s (arena used %u of %u bytes)", {name}_labels[best],
              static_cast<unsigned>(interpreter.arena_used_bytes()), static_cast<unsigned>({name}_arena_size));
  return 0;
}}
"""
    return {f"{stem}_data.h": header, f"{stem}_data.cc": data, f"{stem}_main.cc": main}


def companions(tmp: Path, final: Path, model: tflm.TFLMModel, entry: dict) -> dict:
    """After verification in ``model`` (TFLite Micro's interpreter at the exact arena): the firmware sources next
    to ``final`` (written atomically), and the manifest fields ``tflite_micro`` (arena, ops, runtime version,
    sources)."""
    from edgepkd.rundir import atomic_write_bytes

    blob = tmp.read_bytes()
    ops = tflm.op_names(blob)
    sources = firmware_sources(blob, final.stem, entry, model.arena, ops)
    for file, text in sources.items():
        atomic_write_bytes(final.parent / file, text.encode())
    return {"tflite_micro": {"arena_bytes": model.arena, "ops": ops, "runtime_version": model.version,
                             "sources": sorted(sources),
                             "arena": "measured: the smallest arena_size that allocates and invokes (bisection)"}}
