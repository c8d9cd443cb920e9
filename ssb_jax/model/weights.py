"""Hugging Face safetensors checkpoints <-> the Flax model.

Loading builds the model abstractly (`nnx.eval_shape`: shapes and logical axes, nothing allocated),
then streams tensor by tensor into one preallocated host buffer per parameter (layers stacked),
casting on the way, places each parameter on device (with the sharding its logical axes give on
`mesh`) and frees the host copy, so peak host memory stays near one copy of the weights. The filled
state is merged into the model's graph definition at the end.
"""
from __future__ import annotations

import contextlib

import json
import logging
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from ssb_jax.model.config import ModelConfig
from flax import nnx

from ssb_jax.model.qwen2 import abstract_model

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# HF tensor name (inside a layer) -> (the model state's path inside "layers", transpose?)
_LAYER_TENSORS = {
    "input_layernorm.weight": (("attn_norm", "scale"), False),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), False),
    "self_attn.q_proj.weight": (("attn", "q_proj", "kernel"), True),
    "self_attn.q_proj.bias": (("attn", "q_proj", "bias"), False),
    "self_attn.k_proj.weight": (("attn", "k_proj", "kernel"), True),
    "self_attn.k_proj.bias": (("attn", "k_proj", "bias"), False),
    "self_attn.v_proj.weight": (("attn", "v_proj", "kernel"), True),
    "self_attn.v_proj.bias": (("attn", "v_proj", "bias"), False),
    "self_attn.o_proj.weight": (("attn", "o_proj", "kernel"), True),
    "mlp.gate_proj.weight": (("mlp", "gate_proj", "kernel"), True),
    "mlp.up_proj.weight": (("mlp", "up_proj", "kernel"), True),
    "mlp.down_proj.weight": (("mlp", "down_proj", "kernel"), True),
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": (("embed", "embedding"), False),
    "model.norm.weight": (("final_norm", "scale"), False),
    "lm_head.weight": (("lm_head", "kernel"), True),
}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and tensor."""


# safetensors dtypes a model can be loaded from: floating point only (integer and float8 weights are
# quantized: cast to float they would load silently as nonsense)
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# finite_check: "sample" reads FINITE_SAMPLES values spread through each tensor (a whole layer of NaNs,
# or an overflow in the cast, is caught for free); "full" reads every value; "off" none
FINITE_CHECKS = ("sample", "full", "off")
FINITE_SAMPLES = 4096


def _check_finite(values: np.ndarray, source: np.ndarray, file: Path, name: str, mode: str,
                  transposed: bool) -> None:
    """Raise CheckpointError naming the tensor when `values` (one tensor as loaded, after the cast to the
    model's dtype; contiguous) holds a NaN or infinity; `source`: the same tensor as stored (in the
    model's layout, `transposed` from the file's), to say which it was and where."""
    if mode == "off" or values.size == 0:
        return
    flat = values.reshape(-1)
    if mode == "full":
        where = np.flatnonzero(~np.isfinite(flat))
    else:
        where = np.arange(0, flat.size, max(1, flat.size // FINITE_SAMPLES))
        where = where[~np.isfinite(flat[where])]
    if where.size == 0:
        return
    position = tuple(int(i) for i in np.unravel_index(int(where[0]), values.shape))
    stored = source[position]
    if transposed:
        position = position[::-1]
    cause = (f"stored as {stored}" if not np.isfinite(stored)
             else f"{stored} overflows the model's dtype {values.dtype}")
    raise CheckpointError(f"{file}: tensor {name!r} holds a non-finite value at {position} ({cause}); "
                          "the checkpoint is corrupt or was saved from a diverged run")


def check_vocabulary(tokenizer, config: ModelConfig, checkpoint: str | Path, tokenizer_path: str | Path) -> None:
    """A tokenizer whose ids reach past the embedding's rows would index outside it (XLA clamps the index,
    silently): raise CheckpointError naming both."""
    vocab = tokenizer.get_vocab()
    top = max(max(vocab.values(), default=-1), len(tokenizer) - 1)
    if top >= config.vocab_size:
        raise CheckpointError(
            f"{tokenizer_path}: the tokenizer has ids up to {top}, but model.embed_tokens.weight in {checkpoint} "
            f"has {config.vocab_size} rows (vocab_size); the tokenizer belongs to another model")


# ----------------------------------------------------------------------------- locating

def resolve_checkpoint(path_or_id: str | Path) -> Path:
    """A local directory, or a hub id downloaded (config + safetensors + tokenizer) when online."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a checkpoint directory holding config.json and *.safetensors")
        return path
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise CheckpointError(f"{path_or_id}: no such local directory, and not a hub id of the form 'org/name'")
    from ssb_jax.model.hub import hub_snapshot  # only when reaching for the hub: the cache, else a quick probe
    try:
        local = hub_snapshot(
            str(path_or_id),
            allow_patterns=["*.json", "*.safetensors", "*.txt", "tokenizer*", "*.jinja"])
    except Exception as e:  # offline, no such repo, gated...
        raise CheckpointError(f"could not fetch {path_or_id!r} from the Hugging Face hub ({e}); "
                              "pass a local checkpoint directory instead") from e
    return Path(local)


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / name for name in weight_map.values()})
        missing = [f for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} lists shard {missing[0].name}, which is not in {directory}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{directory} holds only pickle-format weights ({', '.join(sorted(pickles))}); ssb_jax loads "
                "safetensors only, since unpickling can run arbitrary code. Convert it with transformers: "
                "model.save_pretrained(dir, safe_serialization=True)")
        raise CheckpointError(f"{directory}: no *.safetensors files")
    return files


# ----------------------------------------------------------------------------- loading

def _target_of(name: str, config: ModelConfig):
    """(leaf path, layer index or None, transpose) for an HF tensor name, or None if unknown."""
    m = _LAYER_NAME.match(name)
    if m:
        entry = _LAYER_TENSORS.get(m.group(2))
        if entry is None or int(m.group(1)) >= config.num_layers:
            return None
        return ("layers",) + entry[0], int(m.group(1)), entry[1]
    entry = _GLOBAL_TENSORS.get(name)
    if entry is None:
        return None
    return entry[0], None, entry[1]


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


@contextlib.contextmanager
def _readable(file: Path):
    """safe_open, with a truncated or corrupt file named in one line (safetensors' own message names
    neither the file nor the likely cause)."""
    try:
        with safe_open(str(file), framework="np") as f:
            yield f
    except (SafetensorError, OSError) as error:
        size = file.stat().st_size if file.exists() else 0
        raise CheckpointError(f"{file}: unreadable safetensors file ({size} bytes; {error}); it is probably "
                              "truncated or corrupt: download or save it again") from None


def load_params(path_or_id: str | Path, config: ModelConfig | None = None, *, dtype: str | None = None,
                mesh=None, overrides: dict | None = None, finite_check: str = "sample"):
    """Load a Qwen2 HF checkpoint into (ModelConfig, Qwen2ForCausalLM), each weight placed on `mesh`
    by its logical axes (ssb_jax.sharding), or on the default device without a mesh. overrides:
    ModelConfig fields to change (dtype among them). Integer (quantized) weights are refused, and
    NaN or infinite values (`finite_check`: "sample", "full" or "off", see FINITE_CHECKS) stop the load,
    each with one line naming the file and tensor."""
    if finite_check not in FINITE_CHECKS:
        raise ValueError(f"finite_check={finite_check!r}; expected one of {', '.join(FINITE_CHECKS)}")
    directory = resolve_checkpoint(path_or_id)
    if config is None:
        config = ModelConfig.from_json(directory / "config.json")
    if dtype is not None:
        config = config.replace(dtype=dtype)
    if overrides:
        config = config.replace(**overrides)
    np_dtype = np.dtype(config.jnp_dtype)
    graphdef, abstract = nnx.split(abstract_model(config))
    shapes = jax.tree.map(lambda x: tuple(x.shape), nnx.to_pure_dict(abstract))
    shardings = None
    if mesh is not None:
        from ssb_jax.sharding import state_shardings
        shardings = nnx.to_pure_dict(state_shardings(abstract, mesh))
    buffers: dict = {}
    filled: dict[tuple, set] = {}

    for file in safetensors_files(directory):
        with _readable(file) as f:
            for name in f.keys():
                target = _target_of(name, config)
                if target is None:
                    raise CheckpointError(f"{file}: unexpected tensor {name!r} for a {config.num_layers}-layer Qwen2 model")
                leaf, layer, transpose = target
                if leaf[0] == "lm_head" and config.tie_word_embeddings:
                    continue  # some tied checkpoints store the shared matrix twice
                full_shape = _get(shapes, leaf)
                want = full_shape[1:] if layer is not None else full_shape
                stored_dtype = f.get_slice(name).get_dtype()
                if stored_dtype not in FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} is stored as {stored_dtype}, not floating point (a quantized "
                        f"checkpoint?); ssb_jax loads {', '.join(FLOAT_DTYPES)} weights: dequantize it first")
                tensor = f.get_tensor(name)
                got = tuple(reversed(tensor.shape)) if transpose else tuple(tensor.shape)
                if got != tuple(want):
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies "
                        f"{tuple(reversed(want)) if transpose else tuple(want)}")
                if transpose:
                    tensor = tensor.T
                if leaf not in filled:
                    _set(buffers, leaf, np.empty(full_shape, np_dtype))
                    filled[leaf] = set()
                with np.errstate(over="ignore"):  # an overflow in the cast is reported by _check_finite
                    if layer is None:
                        _get(buffers, leaf)[...] = tensor
                        filled[leaf].add(None)
                        loaded = _get(buffers, leaf)
                    else:
                        _get(buffers, leaf)[layer] = tensor
                        filled[leaf].add(layer)
                        loaded = _get(buffers, leaf)[layer]
                _check_finite(loaded, tensor, file, name, finite_check, transpose)
                del tensor, loaded

    expected = {path: shape for path, shape in _leaf_paths(shapes)}
    for leaf in expected:
        need = set(range(config.num_layers)) if leaf[0] == "layers" else {None}
        have = filled.get(leaf, set())
        if need - have:
            hf = _hf_name(leaf, min(need - have, key=lambda x: -1 if x is None else x))
            raise CheckpointError(f"{directory}: missing tensor {hf!r}")

    params: dict = {}
    for leaf in expected:
        host = _get(buffers, leaf)
        sharding = _get(shardings, leaf) if shardings is not None else None
        _set(params, leaf, jax.device_put(host, sharding) if sharding is not None else jax.device_put(host))
        _set(buffers, leaf, None)  # free the host copy before placing the next parameter
        del host
    log.info("loaded %s (%d parameters, %s)", directory, config.param_count(), config.dtype)
    nnx.replace_by_pure_dict(abstract, params)
    return config, nnx.merge(graphdef, abstract)


def _leaf_paths(shapes, prefix=()) -> Iterable[tuple[tuple, tuple]]:
    for key, value in shapes.items():
        if isinstance(value, Mapping):
            yield from _leaf_paths(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def _hf_name(leaf: tuple, layer: int | None) -> str:
    for name, (path, _) in _GLOBAL_TENSORS.items():
        if path == leaf:
            return name
    for name, (path, _) in _LAYER_TENSORS.items():
        if ("layers",) + path == leaf:
            return f"model.layers.{layer}.{name}"
    raise KeyError(leaf)


# ----------------------------------------------------------------------------- saving

def hf_tensors(model, config: ModelConfig) -> Iterable[tuple[str, Callable[[], np.ndarray]]]:
    """(HF name, thunk giving the numpy tensor in HF layout), one per checkpoint tensor."""
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for name, (leaf, transpose) in _GLOBAL_TENSORS.items():
        if leaf[0] == "lm_head" and config.tie_word_embeddings:
            continue
        yield name, (lambda leaf=leaf, t=transpose: _to_hf(_get(params, leaf), t))
    for layer in range(config.num_layers):
        for suffix, (path, transpose) in _LAYER_TENSORS.items():
            yield (f"model.layers.{layer}.{suffix}",
                   lambda path=path, t=transpose, i=layer: _to_hf(_get(params["layers"], path)[i], t))


def _to_hf(array, transpose: bool) -> np.ndarray:
    host = np.asarray(jax.device_get(array))
    return np.ascontiguousarray(host.T if transpose else host)


def save_params(model, config: ModelConfig, directory: str | Path, *,
                max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write a model's config.json and HF safetensors (sharded with an index above max_shard_bytes)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    metadata = {"format": "pt"}  # transformers expects this tag
    # Shards are written as they fill (peak memory: one shard), then renamed once their count is known.
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        part = directory / f".partial-{len(written):05d}.safetensors"
        save_file(shard, str(part), metadata=metadata)
        written.append((part, list(shard)))

    for name, thunk in hf_tensors(model, config):
        tensor = thunk()
        if shard and size + tensor.nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name] = tensor
        size += tensor.nbytes
        total += tensor.nbytes
    flush()
    if len(written) == 1:
        written[0][0].replace(directory / "model.safetensors")
        return directory
    weight_map = {}
    for i, (part, names) in enumerate(written):
        file = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        part.replace(directory / file)
        weight_map.update({name: file for name in names})
    (directory / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return directory
