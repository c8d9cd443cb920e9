"""export: the last round's student as a PEFT adapter and a merged Hugging Face model, each with the
prompts, sampling settings and model card of the run that trained it."""
from __future__ import annotations

import json
import logging

from ssb_jax.pipeline.stage import Stage

log = logging.getLogger("ssb_jax")

USAGE = """\
```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained("{path}")
model = AutoModelForCausalLM.from_pretrained("{path}")
# no system message: the chat template supplies the training system prompt
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "What is 17 + 25?"}}],
                                    add_generation_prompt=True, return_tensors="pt")
print(tokenizer.decode(model.generate(ids)[0, ids.shape[1]:]))  # sampling settings: generation_config.json
```

With ssb_jax: `prompts = ssb_jax.export.load_prompts("{path}")`, then
`Sampler(model, tokenizer).generate([prompts.student_messages(question)], sampling)`."""


class ExportStage(Stage):
    name = "export"
    depends_on = ("train",)
    summary = "the student as a PEFT adapter and a merged Hugging Face model"

    def applies(self, ctx):
        return "student" in ctx.candidates

    def fingerprint(self, ctx, r):
        last = ctx.config.num_rounds
        return {"base": ctx.base_identity(last), "student": ctx.stage_digest(last, "train"),
                "export": dict(ctx.config.export), "prompts": dict(ctx.config.prompts),
                "sampling": {k: ctx.config.eval[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens")}}

    def run(self, ctx, r):
        import jax

        from ssb_jax.export import export_merged_model, export_peft_adapter
        out = self.directory(ctx, r)
        lora, lora_config = ctx.candidates["student"].adapters()
        model = ctx.round_model
        if jax.process_index() == 0:
            dtype = ctx.config.export.merged_dtype or None
            if ctx.config.export.peft_adapter:
                base = ctx.config.model.path
                if ctx.config.num_rounds > 1:  # the last adapters sit on the earlier rounds' merged students
                    base = export_merged_model(model, None, None, ctx.model_config, out / "peft_base",
                                               tokenizer=ctx.tokenizer, dtype=dtype)
                export_peft_adapter(lora, lora_config, out / "peft_adapter", base, tokenizer=ctx.tokenizer,
                                    info=export_info(ctx, out / "peft_adapter"))
            if ctx.config.export.merged_model:
                export_merged_model(model, lora, lora_config, ctx.model_config, out / "merged",
                                    tokenizer=ctx.tokenizer, dtype=dtype, info=export_info(ctx, out / "merged"))
        log.info("export: PEFT adapter and merged model in %s", out)
        return {}


BASELINE_METHOD = ("The {name} baseline of ssb_jax (its stage `{name}`), trained from the base on the training "
                   "questions with the settings in its run directory's config.json (section `{name}`).")


def export_info(ctx, path, baseline: str | None = None):
    """The export's prompts, generation settings (the evaluation's sampled settings) and model card; a
    `baseline` stage's export (grpo, onpolicy, ...) says that stage trained it instead of SSB."""
    from ssb_jax.export import ExportInfo, generation_settings
    from ssb_jax.model.tokenizer import stop_token_ids
    c, e, t = ctx.config, ctx.eval_config, ctx.train_config
    stops = stop_token_ids(ctx.tokenizer)
    generation = generation_settings(e.temperature, e.top_p, e.top_k, e.max_new_tokens, stops, None)
    prompts = ctx.prompts
    train_dir = ctx.round_dir(c.num_rounds) / "train"
    done = _json(train_dir / "DONE.json")
    kept = [_json(ctx.round_dir(k) / "curate" / "curation_summary.json") for k in range(1, c.num_rounds + 1)]
    results = ctx.workdir / "eval" / "results.md"
    rounds = f" ({c.num_rounds} rounds, each from the previous round's merged student)" if c.num_rounds > 1 else ""
    card = {
        "Base model": f"`{c.model.path}`" + ("" if baseline else rounds),
        "Method": (
            "Semantic Soft Bootstrapping (SSB, arXiv:2512.05105): RL-free self-distillation. The base samples "
            "answers to training questions; shown one right and one wrong answer as a hint, it writes a robust "
            "solution; a LoRA student then learns that hinted teacher's token distributions from the plain "
            f"question (KL at temperature {t.temperature}, top-{t.topk} teacher log-probs).\n\n"
            f"LoRA rank {t.lora_rank}, alpha {t.lora_alpha}, on {', '.join(t.lora_targets)}; learning rate "
            f"{t.learning_rate} ({t.schedule}), batch size {t.batch_size}, {t.epochs} epochs"
            + (f", {done['steps']} steps" if done.get("steps") else "") + f"; student input: {t.student_format}."
            if baseline is None else BASELINE_METHOD.format(name=baseline)),
        "Data": f"Training questions: `{c.data.train or 'the toy world'}`. " + ("" if baseline else "; ".join(
            f"round {k}: {s.get('verdicts', {}).get('kept', '?')} kept pairs from {s.get('questions', '?')} questions"
            for k, s in enumerate(kept, 1) if s)),
        "Prompt": ("Trained with this system prompt (the exported chat template renders it when a chat has no "
                   "system message):\n\n```text\n" + (prompts.system_prompt or "(none: the template's own)") +
                   "\n```\n\nUser message: `" + prompts.student_template + "`, the question in place of "
                   "`{question}`."),
        "Sampling settings": ("`generation_config.json` (the evaluation's sampled settings; pass@1 is greedy):"
                              f"\n\n```json\n{json.dumps(generation, indent=1)}\n```"),
        "Evaluation": results.read_text() if results.is_file() else "Not evaluated before this export.",
        "Use": USAGE.format(path=path),
    }
    return ExportInfo(prompts=prompts, generation=generation, card=card,
                      model="SSB student" if baseline is None else f"{baseline} baseline")


def _json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
