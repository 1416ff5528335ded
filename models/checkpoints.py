"""Reading backbone weights from checkpoint files, safely by default.

Three layouts are understood (see docs/models.md):

- robustness-library ``.pt``: a dict with ``model`` (or ``state_dict``) whose weights sit under
  ``module.model.`` (and again under ``module.attacker.model.``, ignored), with the input
  normaliser's ``module.normalizer.new_mean`` / ``new_std`` buffers;
- a plain torchvision state dict (``.pt`` / ``.pth``), possibly under ``state_dict`` or
  ``model``, possibly with DataParallel's ``module.`` prefix;
- our own ``.safetensors`` (an IT model written by :func:`models.write_it_model`, or a bare
  backbone state dict) with a sidecar ``.json`` naming the architecture.

Our own files (IT models, classifiers) are written by :func:`write_checkpoint`: the weights as
``NAME.safetensors`` and a sidecar ``NAME.json`` (format, version, the weights' sha256 and what
rebuilds the model), read back checked by :func:`read_sidecar_metadata`.

``.pt`` files are opened with ``torch.load(weights_only=True)``, which only rebuilds tensors and
plain containers. A file that needs full unpickling (it holds other Python objects, whose
unpickling can run arbitrary code) is refused unless the caller passes ``trust=True``.
The architecture of a ``.pt`` file is recognised from its weight names and shapes.

Every file that is not what it should be (a text file named ``.pt``, a truncated or corrupt
``.safetensors``, a sidecar that is not a JSON object) is refused with a ``ValueError`` naming
the file and what is wrong with it, never an exception from deep inside torch or safetensors.
"""

from __future__ import annotations

import functools
import io
import json
import pickle
import pickletools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from closedloop.core.files import atomic_path, compute_file_digest, write_json
from closedloop.core.logs import logger
from closedloop.core.validation import check_file
from models.networks import ARCHITECTURES, IMAGENET_MEAN, IMAGENET_STD, make_network

__all__ = [
    "CheckpointWeights", "read_checkpoint_weights", "load_network_weights", "describe_key_mismatch", "TRUST_HINT",
    "write_checkpoint", "read_sidecar_metadata", "SIDECAR_KEYS",
]

TRUST_HINT = "trust=True (in experiment.toml: [model] trust_checkpoint = true)"
# Where the network weights sit, tried in this order: robustness library (multi-GPU, single-GPU),
# a closedloop IT model, DataParallel, bare.
_PREFIXES = ("module.model.", "model.", "backbone.network.", "module.", "")
_NORMALIZERS = (
    ("module.normalizer.new_mean", "module.normalizer.new_std"),
    ("normalizer.new_mean", "normalizer.new_std"),
    ("backbone.mean", "backbone.std"),
)
_NESTED = ("model", "state_dict")
_OPTIONAL = ".num_batches_tracked"  # batch-norm step counters: absent from old checkpoints, unused in eval
# What write_checkpoint adds to a sidecar, beside the caller's document.
SIDECAR_KEYS = ("format", "format_version", "weights_sha256")
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save since torch 1.6
_LEGACY_HEAD_BYTES = 4096  # the legacy format opens with a small pickle of torch's magic number


@dataclass(frozen=True)
class CheckpointWeights:
    """Backbone weights read from a file: torchvision key names, float32 tensors.

    ``mean``/``std``: the input normalisation to use (ImageNet's unless the file says otherwise).
    ``input_size``: side (px) the network was trained at, to which images are area-downsampled
    first (from our own files' metadata; 0 = none, the case for every other layout).
    """

    path: Path
    architecture: str
    state: dict[str, torch.Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    input_size: int = 0


def read_checkpoint_weights(path: str | Path, *, trust: bool = False) -> CheckpointWeights:
    """Read the backbone weights of a checkpoint file (see the module docstring for layouts).

    Raises ``FileNotFoundError`` if there is no such file, ``ValueError`` if the file cannot be
    read safely (names the ``trust`` flag), holds no ResNet weights, or its weights fit no known
    architecture (lists expected and found keys).
    """
    path = check_file("source", path)
    input_size = 0
    if path.suffix == ".safetensors":
        tensors, architecture, num_classes, input_size = _read_safetensors(path)
    else:
        tensors, architecture, num_classes = _unwrap(_torch_load(path, trust), path), None, None
    prefix = _find_prefix(tensors, path)
    mean, std = _read_normalizer(tensors, path)
    state = {
        key[len(prefix) :]: value.float() if value.is_floating_point() else value
        for key, value in tensors.items()
        if key.startswith(prefix)
    }
    if num_classes is None:
        num_classes = int(state["fc.weight"].shape[0]) if "fc.weight" in state else 1000
    if architecture is None:
        architecture = _detect_architecture(state, num_classes, path)
    return CheckpointWeights(path, architecture, state, mean, std, num_classes, input_size)


def load_network_weights(network: nn.Module, weights: CheckpointWeights, *, needed_for: str) -> None:
    """Load into ``network`` (in place, ``assign=True``) every weight it has, from ``weights``.

    Missing batch-norm step counters are filled with 0; any other missing or wrongly shaped weight
    is refused with a ``ValueError`` listing them. ``needed_for`` says what the weights are for in
    that message (e.g. "up to layer 'layer4.0'").
    """
    expected = {key: tuple(value.shape) for key, value in network.state_dict().items()}
    state = {key: weights.state[key] for key in expected if key in weights.state}
    for key in expected:
        if key.endswith(_OPTIONAL) and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    found = {key: tuple(value.shape) for key, value in state.items()}
    if found != expected:
        raise ValueError(
            f"checkpoint {str(weights.path)!r} does not hold the {weights.architecture} weights needed {needed_for}: "
            f"{describe_key_mismatch(expected, found)} (The file holds {len(weights.state)} weight tensors in all.)"
        )
    network.load_state_dict(state, strict=True, assign=True)


def _check_torch_file(path: Path) -> None:
    """Refuse a file that torch.save did not write: neither its zip archive nor its legacy pickle,
    which opens with torch's magic number. Reads the first bytes only; runs nothing."""
    with path.open("rb") as stream:
        head = stream.read(_LEGACY_HEAD_BYTES)
    if head.startswith(_ZIP_MAGIC):
        return
    try:
        first = [arg for _, arg, _ in pickletools.genops(io.BytesIO(head))]  # the first pickle, to its STOP
    except Exception:  # noqa: BLE001 - any parse failure means: not a pickle
        first = []
    if torch.serialization.MAGIC_NUMBER not in first:
        shown = head[:16]
        raise ValueError(
            f"checkpoint {str(path)!r} is not a PyTorch checkpoint: it is neither a torch.save zip archive nor "
            f"a legacy torch pickle (it starts with {shown!r}); give a .pt/.pth written by torch.save, or a "
            ".safetensors file."
        )


def _torch_load(path: Path, trust: bool) -> object:
    _check_torch_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = _unpickling_reason(str(error))
        if not trust:
            raise ValueError(
                f"checkpoint {str(path)!r} cannot be loaded safely: it holds Python objects beyond tensors "
                f"and plain containers ({reason}). Loading it fully runs code stored in the file; if you "
                f"trust where the file came from, pass {TRUST_HINT}."
            ) from None
    except Exception as error:  # noqa: BLE001 - a damaged file fails anywhere inside torch.load
        raise ValueError(f"cannot read checkpoint {str(path)!r}: a damaged PyTorch file ({error!r}).") from None
    logger.warning("loading %s with full unpickling (trusted by the caller)", path)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - full unpickling can fail with any exception
        raise ValueError(f"cannot read checkpoint {str(path)!r}, even with full unpickling: {error!r}.") from None


def _unpickling_reason(message: str) -> str:
    found = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. |\n|$)", message)
    return found.group(1).strip() if found else "torch.load with weights_only=True failed"


def _unwrap(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded object: descend into ``model``/``state_dict``; modules give theirs."""
    for _ in range(len(_NESTED) + 1):
        if isinstance(loaded, nn.Module):
            loaded = loaded.state_dict()
        if isinstance(loaded, Mapping):
            inner = next((loaded[key] for key in _NESTED if isinstance(loaded.get(key), (Mapping, nn.Module))), None)
            if inner is None:
                break
            loaded = inner
    tensors = {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)} if isinstance(loaded, Mapping) else {}
    if not tensors:
        shown = _sample(loaded) if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ValueError(
            f"checkpoint {str(path)!r} holds no state dict: expected a dict of tensors, possibly under "
            f"'model' or 'state_dict'; found {shown}."
        )
    return tensors


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], str, int, int]:
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} has no metadata file {str(sidecar)!r} naming its architecture; "
            f"write checkpoints with models.write_it_model, which writes both."
        )
    metadata = _read_json_object(sidecar)
    described = metadata.get("backbone", metadata)
    architecture = described.get("architecture") if isinstance(described, dict) else None
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"{str(sidecar)!r}: 'architecture' must be one of {', '.join(ARCHITECTURES)}, but got {architecture!r}."
        )
    input_size = described.get("input_size", 0)
    if not isinstance(input_size, int) or isinstance(input_size, bool) or input_size < 0:
        raise ValueError(
            f"{str(sidecar)!r}: 'input_size' must be a whole number of pixels >= 0 (0 = none), but got {input_size!r}."
        )
    num_classes = described.get("num_classes", 1000)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"{str(sidecar)!r}: 'num_classes' must be a whole number >= 1, but got {num_classes!r}.")
    return _load_safetensors(path), architecture, num_classes, input_size


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError) as error:
        raise ValueError(
            f"checkpoint {str(path)!r} is not a valid safetensors file ({error}); it may be truncated or damaged: "
            "copy or write it again."
        ) from None


def _read_json_object(path: Path) -> dict:
    """The JSON object in the file ``path``; a ``ValueError`` naming it for anything else."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}); write the metadata file again.") from None
    if not isinstance(document, dict):
        raise ValueError(
            f"{str(path)!r} must hold a JSON object ({{\"architecture\": ...}}), but holds a "
            f"{type(document).__name__}: {json.dumps(document)[:60]}."
        )
    return document


def _find_prefix(tensors: Mapping[str, torch.Tensor], path: Path) -> str:
    for prefix in _PREFIXES:
        if f"{prefix}conv1.weight" in tensors:
            return prefix
    wanted = ", ".join(repr(f"{p}conv1.weight") for p in _PREFIXES)
    raise ValueError(
        f"checkpoint {str(path)!r} holds no ResNet weights: expected one of the keys {wanted}; "
        f"found {_sample(tensors)}."
    )


def _read_normalizer(tensors: Mapping[str, torch.Tensor], path: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    for mean_key, std_key in _NORMALIZERS:
        if mean_key in tensors and std_key in tensors:
            mean = tuple(tensors[mean_key].flatten().tolist())
            std = tuple(tensors[std_key].flatten().tolist())
            imagenet = torch.allclose(torch.tensor(mean + std), torch.tensor(IMAGENET_MEAN + IMAGENET_STD), atol=1e-4)
            if not imagenet:
                logger.warning(
                    "%s: its input normaliser (mean %s, std %s) differs from ImageNet's; using the checkpoint's",
                    path, _rounded(mean), _rounded(std),
                )
            return mean, std
    return IMAGENET_MEAN, IMAGENET_STD


def _detect_architecture(state: Mapping[str, torch.Tensor], num_classes: int, path: Path) -> str:
    """The registered architecture whose weight names and shapes the state fits (no conflicts, most keys)."""
    found = {key: tuple(value.shape) for key, value in state.items()}
    best, best_score, best_expected = None, -1, {}
    for architecture in ARCHITECTURES:
        expected = _weight_shapes(architecture, num_classes)
        conflicts = [key for key, shape in found.items() if expected.get(key) != shape]
        score = len(found) - len(conflicts)
        if not conflicts:
            return architecture
        if score > best_score:
            best, best_score, best_expected = architecture, score, expected
    raise ValueError(
        f"checkpoint {str(path)!r}: its weights fit none of the known architectures "
        f"({', '.join(ARCHITECTURES)}). Closest is {best}: {describe_key_mismatch(best_expected, found)}"
    )


@functools.lru_cache(maxsize=16)
def _weight_shapes(architecture: str, num_classes: int) -> dict[str, tuple[int, ...]]:
    network = make_network(architecture, num_classes=num_classes, seed=None)
    return {key: tuple(value.shape) for key, value in network.state_dict().items()}


def describe_key_mismatch(expected: Mapping[str, tuple], found: Mapping[str, tuple]) -> str:
    """A message listing missing, unexpected and wrongly shaped keys (counts and a few of each)."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    wrong = [
        f"{key}: expected {expected[key]}, found {found[key]}"
        for key in found
        if key in expected and expected[key] != found[key]
    ]
    parts = [
        f"{len(missing)} expected keys missing (e.g. {', '.join(missing[:4])})" if missing else "",
        f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:4])})" if unexpected else "",
        f"{len(wrong)} keys with the wrong shape (e.g. {'; '.join(wrong[:3])})" if wrong else "",
    ]
    summary = "; ".join(part for part in parts if part)
    return f"{summary}. Expected {len(expected)} keys like {_sample(expected)}; found {len(found)} keys like {_sample(found)}."


def _sample(mapping: Mapping, n: int = 4) -> str:
    keys = list(mapping)
    shown = ", ".join(repr(k) for k in keys[:n])
    return f"[{shown}{', …' if len(keys) > n else ''}] ({len(keys)} keys)"


def _rounded(values: tuple[float, ...]) -> list[float]:
    return [round(v, 4) for v in values]


def write_checkpoint(
    state: Mapping[str, torch.Tensor],
    path: str | Path,
    document: Mapping,
    *,
    format_name: str,
    format_version: int,
    document_name: str = "metadata",
) -> Path:
    """Write ``state`` to ``path`` (.safetensors) and ``document`` to ``path.with_suffix(".json")``.

    The JSON holds ``document``, then ``format``/``format_version`` and the sha256 of the weights
    file (see :data:`SIDECAR_KEYS`), so :func:`read_sidecar_metadata` detects a mismatched pair.
    Both files are written under temporary names and renamed into place, the weights last.
    ``document_name`` names the caller's parameter that ``document`` came from, for the message
    refusing values that are not JSON-able. Returns ``path``.
    """
    path = Path(path).expanduser()
    if path.suffix != ".safetensors":
        raise ValueError(f"'path' must end in '.safetensors', but got {str(path)!r}; e.g. {path.stem}.safetensors.")
    document = dict(document) | {"format": format_name, "format_version": format_version}
    try:
        json.dumps(document)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{document_name!r} must hold JSON-able values (str, numbers, lists, dicts): {error}.") from None
    with atomic_path(path) as weights_tmp:
        save_file({key: value.detach().cpu().contiguous() for key, value in state.items()}, weights_tmp)
        document["weights_sha256"] = compute_file_digest(weights_tmp)
        write_json(path.with_suffix(".json"), document)
    return path


def read_sidecar_metadata(path: Path, *, format_name: str, format_version: int, what: str, noun: str, fix: str) -> dict:
    """The JSON metadata beside a ``.safetensors`` file we wrote, checked against the weights.

    Refuses a missing sidecar, another format or version, and weights whose sha256 differs from
    the one recorded (an interrupted write, or files from two different saves). For the
    messages: ``what`` names the kind of metadata, ``noun`` the thing saved, ``fix`` how to write it.
    """
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{str(path)!r} has no metadata file {str(sidecar)!r}; {fix}.")
    document = _read_json_object(sidecar)
    if document.get("format") != format_name or document.get("format_version") != format_version:
        raise ValueError(
            f"{str(sidecar)!r} is not closedloop {what} metadata (format {format_name!r} version {format_version}); "
            f"got format {document.get('format')!r} version {document.get('format_version')!r}."
        )
    if document.get("weights_sha256") != compute_file_digest(path):
        raise ValueError(
            f"{str(path)!r} does not match the sha256 recorded in {str(sidecar)!r} (an interrupted or partial "
            f"write, or files from two different saves); write the {noun} again."
        )
    return document
