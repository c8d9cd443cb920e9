"""Cached teacher mode: one pass of the base model over the teacher sequences that keeps, per
answer token, the top-k log-probs of softmax(t / T) and their ids, the log of the remaining
tail mass, and the teacher's log-prob (at T = 1) of the actual solution token (for the
teacher-CE metric), in sharded safetensors files (never pickle).

Temperature: the log-probs are stored at the distillation temperature T (recorded in the
metadata and checked at training time). Storing at T = 1 would not let the tail bucket be
re-tempered exactly (the tail's mass at T depends on the individual tail logits), so a cache
serves one temperature; the top-k ids are the same at every T.

Layout of <dir>: shard_00000.safetensors, ... each with
    logprobs [N, k] float32, ids [N, k] int32, tail_logprob [N] float32, target_logprob [N] float32,
    offsets [E + 1] int64 (example e owns rows offsets[e]:offsets[e+1])
and metadata {"example_ids": JSON list of str(id), "temperature", "k"}; plus index.json.
Bytes per answer token: 8k + 8 (520 for k = 64), versus 4V (607,744 for Qwen2.5's vocabulary) for
full float32 logits.
"""
from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ssb_jax import distributed
from ssb_jax.distill.batch import CachedTeacher, build_batch
from ssb_jax.distill.loss import gather_positions
from ssb_jax.model.attention import kernel_mesh
from ssb_jax.model.config import ModelConfig
from ssb_jax.model.qwen2 import apply
from ssb_jax.sharding import placement_mesh

log = logging.getLogger(__name__)
INDEX = "index.json"
FORMAT = "ssb_jax.teacher_topk.v1"


def topk_from_logits(logits, k: int, temperature: float, targets) -> CachedTeacher:
    """Per token: top-k log-probs of softmax(logits/T) and ids, log tail mass, log-prob (T=1) of targets."""
    logits = logits.astype(jnp.float32)
    logp_T = jax.nn.log_softmax(logits / temperature, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp_T, k)
    V = logits.shape[-1]
    if k < V:
        in_topk = jnp.put_along_axis(jnp.zeros(logp_T.shape, bool), top_ids, True, axis=-1, inplace=False)
        tail = jax.nn.logsumexp(jnp.where(in_topk, -jnp.inf, logp_T), axis=-1)
    else:
        tail = jnp.full(logits.shape[:-1], -jnp.inf, jnp.float32)
    tail = jnp.maximum(tail, -1e30)
    target = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], axis=-1)[..., 0]
    return CachedTeacher(logprobs=top_lp, ids=top_ids.astype(jnp.int32), tail_logprob=tail, target_logprob=target)


def _teacher_topk(graphdef, mesh, state, tokens, positions, mask, index, targets, *, k: int, temperature: float,
                  chunk: int) -> CachedTeacher:
    """The cached teacher's arrays [B, A(, k)] for the teacher sequences tokens/positions/mask [B, T] at
    the answer positions `index` [B, A], whose solution tokens are `targets` [B, A]. mesh: the one the
    state is placed on (a fused attention kernel runs under shard_map over it), or None."""
    with kernel_mesh(mesh):
        hidden, _ = apply(graphdef, state, tokens, positions, mask, return_hidden=True)
    hidden = gather_positions(hidden, index)          # [B, A, D]
    head = nnx.merge(graphdef, state).head_matrix()
    B, A = targets.shape

    def one(h, y):
        logits = jnp.einsum("...d,dv->...v", h, head, preferred_element_type=jnp.float32)
        return topk_from_logits(logits, k, temperature, y)

    if not chunk or chunk >= A:
        return one(hidden, targets)
    n = -(-A // chunk)
    pad = n * chunk - A
    hs = jnp.moveaxis(jnp.pad(hidden, [(0, 0), (0, pad), (0, 0)]).reshape(B, n, chunk, -1), 1, 0)
    ys = jnp.moveaxis(jnp.pad(targets, [(0, 0), (0, pad)]).reshape(B, n, chunk), 1, 0)
    out = jax.lax.map(lambda a: one(*a), (hs, ys))
    return jax.tree.map(lambda o: jnp.moveaxis(o, 0, 1).reshape((B, n * chunk) + o.shape[3:])[:, :A], out)


@functools.lru_cache(maxsize=8)
def _teacher_topk_jit(graphdef, mesh=None):
    return jax.jit(functools.partial(_teacher_topk, graphdef, mesh), static_argnames=("k", "temperature", "chunk"))


def build_teacher_cache(model, model_config: ModelConfig, examples: Sequence[Mapping], directory, *, k: int = 64,
                        temperature: float = 2.0, batch_size: int = 4, chunk: int = 128, buckets: Sequence[int] = (),
                        min_bucket: int = 16, max_seq_len: int = 0, tokens_per_shard: int = 1 << 20,
                        file_prefix: str = "shard", index_name: str = INDEX) -> dict:
    """Run the base model (a Qwen2ForCausalLM without adapters) over every example's teacher sequence and write the cache.
    Returns the index (with n_tokens, bytes_per_token, files).

    file_prefix / index_name let several processes each write a part of one cache into the same
    directory (see `build_teacher_cache_sharded`)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    k = min(int(k), model_config.vocab_size)
    graphdef, state = nnx.split(model)
    state = nnx.to_pure_dict(state)
    shard_rows: list[CachedTeacher] = []  # one per example
    shard_ids: list[str] = []
    shard_lengths: list[int] = []
    files, index_ids, n_tokens, total_bytes = [], {}, 0, 0

    def flush():
        nonlocal total_bytes
        if not shard_ids:
            return
        name = f"{file_prefix}_{len(files):05d}.safetensors"
        tensors = jax.tree.map(lambda *rows: np.ascontiguousarray(np.concatenate(rows)), *shard_rows).arrays()
        tensors["offsets"] = np.concatenate([[0], np.cumsum(shard_lengths)]).astype(np.int64)
        save_file(tensors, str(directory / name), metadata={
            "format": FORMAT, "example_ids": json.dumps(shard_ids), "temperature": repr(float(temperature)), "k": str(k)})
        total_bytes += sum(t.nbytes for key, t in tensors.items() if key != "offsets")
        files.append(name)
        index_ids[name] = list(shard_ids)
        shard_rows.clear()
        shard_ids.clear()
        shard_lengths.clear()

    examples = list(examples)
    for start in range(0, len(examples), batch_size):
        records = examples[start:start + batch_size]
        batch = build_batch(records, batch_size=batch_size, buckets=buckets, min_bucket=min_bucket,
                            max_seq_len=max_seq_len)
        teacher = jax.device_get(_teacher_topk_jit(graphdef, placement_mesh(state))(
            state, batch.teacher_tokens, batch.teacher_positions, batch.teacher_mask, batch.teacher_index,
            batch.answer_tokens, k=k, temperature=float(temperature), chunk=chunk))
        for i, rec in enumerate(records):
            n = int(batch.answer_mask[i].sum())
            shard_rows.append(jax.tree.map(lambda x: np.asarray(x[i, :n]), teacher))
            shard_ids.append(str(rec["id"]))
            shard_lengths.append(n)
            n_tokens += n
        if sum(shard_lengths) >= tokens_per_shard:
            flush()
    flush()
    index = {"format": FORMAT, "temperature": float(temperature), "k": k, "n_examples": len(examples),
             "n_tokens": n_tokens, "bytes": total_bytes, "bytes_per_token": total_bytes / max(n_tokens, 1),
             "full_f32_bytes_per_token": 4 * model_config.vocab_size, "files": index_ids}
    (directory / index_name).write_text(json.dumps(index, indent=1))
    log.info("teacher cache: %d tokens, %.1f bytes/token (full f32 logits: %d)", n_tokens,
             index["bytes_per_token"], 4 * model_config.vocab_size)
    return index


def build_teacher_cache_sharded(model, model_config: ModelConfig, examples: Sequence[Mapping], directory,
                                **kwargs) -> dict:
    """build_teacher_cache under several JAX processes: each process runs every process_count-th
    example on its own devices (`model` placed on a process-local mesh) and writes its part; the
    main process then joins the parts into index.json. With one process it is build_teacher_cache."""
    index, count = jax.process_index(), jax.process_count()
    if count == 1:
        return build_teacher_cache(model, model_config, examples, directory, **kwargs)
    directory = Path(directory)
    part_name = f"index.process-{index}-of-{count}.json"
    build_teacher_cache(model, model_config, distributed.process_shard(examples, index, count), directory,
                        file_prefix=f"shard_p{index}of{count}", index_name=part_name, **kwargs)
    distributed.barrier("teacher_cache:parts")
    if distributed.is_main_process():
        parts = [json.loads((directory / f"index.process-{i}-of-{count}.json").read_text()) for i in range(count)]
        joined = dict(parts[0], files={name: ids for part in parts for name, ids in part["files"].items()})
        for key in ("n_examples", "n_tokens", "bytes"):
            joined[key] = sum(part[key] for part in parts)
        joined["bytes_per_token"] = joined["bytes"] / max(joined["n_tokens"], 1)
        (directory / INDEX).write_text(json.dumps(joined, indent=1))
    distributed.barrier("teacher_cache:index")
    return json.loads((directory / INDEX).read_text())


class TeacherCache:
    """Read side: `cache(example_id)` -> that example's CachedTeacher (numpy, [n, k] and [n]).
    Every shard is read into host memory when opened (8k + 8 bytes per answer token)."""

    def __init__(self, directory, temperature: float | None = None):
        self.directory = Path(directory)
        index_path = self.directory / INDEX
        if not index_path.exists():
            raise FileNotFoundError(f"{index_path} not found; build the cache with build_teacher_cache")
        self.index = json.loads(index_path.read_text())
        if temperature is not None and abs(self.index["temperature"] - temperature) > 1e-9:
            raise ValueError(f"teacher cache {self.directory} holds log-probs at T={self.index['temperature']}, "
                             f"but training uses T={temperature}; rebuild the cache")
        self.k = int(self.index["k"])
        self._rows: dict[str, CachedTeacher] = {}
        for name in self.index["files"]:
            with safe_open(str(self.directory / name), framework="np") as f:
                meta = f.metadata()
                tensors = {key: f.get_tensor(key) for key in f.keys()}
            ids = json.loads(meta["example_ids"])
            off = tensors.pop("offsets")
            for e, example_id in enumerate(ids):
                self._rows[example_id] = CachedTeacher(**{key: t[off[e]:off[e + 1]] for key, t in tensors.items()})

    def __len__(self):
        return len(self._rows)

    def __contains__(self, example_id):
        return str(example_id) in self._rows

    def __call__(self, example_id) -> CachedTeacher:
        try:
            return self._rows[str(example_id)]
        except KeyError:
            raise KeyError(f"example {example_id!r} is not in the teacher cache {self.directory}") from None
