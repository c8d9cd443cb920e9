"""Load ssb_jax's exports with stock transformers and peft only, as a user would, and generate greedily.

Run by test_export_interop from another working directory; argv[1] names a JSON file holding a list of
cases ({merged, adapter, chats, max_new_tokens, stop_ids}); prints a JSON list of results, one per case.
Imports nothing of ssb_jax.
"""
import json
import sys

import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM, AutoTokenizer


def greedy(model, tokenizer, chats, max_new_tokens, stop_ids):
    """Per chat: the stock template's prompt ids, the generated ids and each step's top-2 logit gap."""
    out = []
    for chat in chats:
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        with torch.no_grad():
            result = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                    pad_token_id=stop_ids[0], output_scores=True, return_dict_in_generate=True)
        gaps = [float(torch.topk(s[0].float(), 2).values.diff().abs()) for s in result.scores]
        out.append({"prompt": prompt, "generated": result.sequences[0, len(prompt):].tolist(), "top2_gaps": gaps})
    return out


def run_case(case):
    report = {}
    args = (case["chats"], case["max_new_tokens"], case["stop_ids"])
    for name, directory, loader in (("merged", case["merged"], AutoModelForCausalLM),
                                    ("peft", case["adapter"], AutoPeftModelForCausalLM)):
        tokenizer = AutoTokenizer.from_pretrained(directory)
        model = loader.from_pretrained(directory, dtype=torch.float32).eval()
        report[name] = {"tokenizer_class": type(tokenizer).__name__, "results": greedy(model, tokenizer, *args)}
        if name == "peft":  # the base alone, to show the adapters change what is compared
            with model.disable_adapter():
                report["peft_base"] = {"results": greedy(model, tokenizer, *args)}
    return report


if __name__ == "__main__":
    print(json.dumps([run_case(case) for case in json.load(open(sys.argv[1]))]))
