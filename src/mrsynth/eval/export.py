"""``mrsynth export``: one direction of a trained run as an ONNX model.

A hospital pipeline can then run the generator with onnxruntime (or any ONNX
runtime) without PyTorch or mrsynth. The graph is what ``LoadedRun.translate``
computes for one direction, so any resampling the run's preset does is inside:

* input ``input``: float32 ``(N, C, H, W)``, N dynamic (any batch size), H x W
  the prepared data's slice size, intensities normalised as the run's data
  (``(x - offset) / scale``, brain robust range -> [-1, 1], background -1);
  C = 1, or for a 2.5-D run (``arch.context_slices`` = k) C = 2k + 1: the slices
  ``s - k .. s + k`` of the volume in that order (:mod:`mrsynth.data.context`
  says what stands in for a missing neighbour at the brain's ends);
* output ``output``: the synthetic slices ``(N, 1, H, W)`` (slice ``s``), same units.

Provenance (model, contrasts, direction, size, normalisation) is stored in
the ONNX file's ``metadata_props`` so the file documents its own pre- and
post-processing. torch's ``dynamo`` exporter (``torch.export`` + onnxscript)
is used; the export is checked with ``onnx.checker`` and by running
onnxruntime against PyTorch on the same input (max |difference| reported;
:data:`ONNX_TOLERANCE` is the bound the tests hold it to).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from mrsynth.data.context import in_channels, run_context_slices
from mrsynth.data.slicing import plane_of
from mrsynth.errors import ConfigError, MrsynthError
from mrsynth.eval.common import load_run_checked, parse_direction
from mrsynth.utils import atomic_path, check_can_write

#: Largest |onnxruntime - PyTorch| accepted, in normalised units (outputs span [-1, 1]):
#: float32 kernels differ in summation order, typically by ~1e-6.
ONNX_TOLERANCE = 1e-4


def _slice_size(run: Any) -> tuple[int, int]:
    size = (run.data_settings or {}).get("size")
    if not size or len(size) != 2:
        raise MrsynthError(
            "The run's config.json records no prepared slice size (data.size); it was written "
            "by an incompatible mrsynth version. Retrain the run with this version."
        )
    return int(size[0]), int(size[1])


def _wrapper(run: Any, internal: str, size: tuple[int, int]) -> Any:
    """One batch of ``LoadedRun.translate`` as a module: resample in, generator, resample out.

    ``translate`` itself loops over mini-batches in Python, which would freeze the batch size
    into the graph; the body of one iteration, built from the same functions, does not.
    """
    import torch

    from mrsynth.train.dataset import internal_size, resample

    inner = internal_size(size, run.image_size)

    class Translate(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = run.generator(internal)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return resample(self.net(resample(x, inner)).float(), size)

    return Translate().eval()


@contextlib.contextmanager
def _quiet() -> Any:
    """The exporter prints progress lines and warns about torchvision ops; keep the CLI clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def export_onnx(
    run_dir: str | Path,
    direction: str,
    out: str | Path,
    *,
    overwrite: bool = False,
    opset: int | None = None,
) -> dict[str, Any]:
    """Export ``direction`` of ``run_dir`` to ``out``; return facts about the export."""
    import onnx
    import onnxruntime as ort
    import torch

    dest = check_can_write(out, overwrite, example="model.onnx")
    run = load_run_checked(run_dir, "cpu")
    d = parse_direction(direction, run.contrasts, run_dir)
    h, w = _slice_size(run)
    k = run_context_slices(run)
    c = in_channels(k)
    module = _wrapper(run, d.internal, (h, w))
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(2, c, h, w, generator=gen) * 2 - 1
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module, (example,), input_names=["input"], output_names=["output"],
                dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True, verbose=False,
            )
    except Exception as exc:  # exporter failures are many types; name the run and direction
        raise MrsynthError(
            f"Exporting {d.label} of run {run_dir} to ONNX failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Run with --debug for details."
        ) from exc
    meta = {
        "mrsynth_model": run.model_name,
        "mrsynth_direction": d.label,
        "mrsynth_source_contrast": d.source,
        "mrsynth_target_contrast": d.target,
        "mrsynth_input_shape": f"N,{c},{h},{w}",
        "mrsynth_context_slices": str(k),
        # the slices' plane and geometry: coronal/sagittal runs are fed slices cut across y/x
        "mrsynth_plane": plane_of(run.data_settings),
        "mrsynth_geometry": str((run.data_settings or {}).get("geometry", "")),
        "mrsynth_downsample": str((run.data_settings or {}).get("downsample", 1)),
        "mrsynth_normalisation": json.dumps((run.data_settings or {}).get("normalisation")),
        "mrsynth_run_dir": str(Path(run_dir).resolve()),
    }
    with atomic_path(dest, suffix=".onnx") as tmp:
        with _quiet():
            program.save(str(tmp), external_data=False)
        model = onnx.load(str(tmp))
        got_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                         None)
        if opset is not None and got_opset != opset:
            # torch's exporter writes its lowest supported opset instead of a lower one asked
            # for, without an error; a runtime that needs the older opset would then refuse
            # the file (or the user would believe it is what they asked for)
            raise ConfigError(
                f"--opset {opset}: torch's ONNX exporter wrote opset {got_opset} instead (it "
                f"cannot produce a lower one for {run.model_name}, and ONNX's version "
                f"converter has no adapters for these layers). Nothing was written. Omit "
                f"--opset, or ask for {got_opset} or higher, and use a runtime that reads it.")
        meta["mrsynth_onnx_opset"] = str(got_opset)
        for k, v in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.checker.check_model(model)
        onnx.save(model, str(tmp))
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        probe = (torch.rand(3, c, h, w, generator=gen) * 2 - 1)
        got = sess.run(None, {"input": probe.numpy()})[0]
        with torch.no_grad():
            want = run.translate(probe, d.internal).float().cpu().numpy()
        diff = float(np.abs(got - want).max())
        if not diff <= ONNX_TOLERANCE:
            raise MrsynthError(
                f"The ONNX export of {d.label} from {run_dir} differs from PyTorch by {diff:.3g} "
                f"(tolerance {ONNX_TOLERANCE:g}); it was not written. Please report this."
            )
    return {"path": dest, "direction": d.label, "input_shape": ["N", c, h, w],
            "max_abs_diff": diff, "model": run.model_name, "opset": got_opset}
