"""A real evaluation client: lmms-eval's LLaVA model class (`--model llava_hf_chat`) answers one
hand-made image question with an exported workbench student, offline, and gives what the
student's own greedy `generate` gives. Needs the `eval` extra (`pip install -e ".[eval]"`),
so it is marked slow and skipped without lmms-eval.

(lmms-eval 0.7.3's generic `--model huggingface` class cannot run any processor under
transformers 5: it passes `audios=` to it, which transformers 5 refuses.)"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY_STUDENT, make_tiny_vlm
from workbench.data.llava import LlavaDataset

pytestmark = pytest.mark.slow
lmms_eval = pytest.importorskip("lmms_eval")


def test_lmms_eval_huggingface_model_answers_with_an_exported_student(processor, world_dir, tmp_path):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.chat.llava_hf import LlavaHf

    import students

    model = make_tiny_vlm(processor, **TINY_STUDENT)
    folder = tmp_path / "student"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    students.write_remote_code(model, folder)

    sample = LlavaDataset(world_dir / "val.json")[0]
    question = next(part["text"] for part in sample["messages"][0]["content"] if part["type"] == "text")
    doc = {"image": sample["image"], "question": question}

    def doc_to_messages(d):
        return [{"role": "user", "content": [{"type": "image", "url": d["image"]}, {"type": "text", "text": d["question"]}]}]

    client = LlavaHf(pretrained=str(folder), device="cpu", device_map="cpu", dtype="float32", batch_size=1)
    client.task_dict = {"handmade": {"test": [doc]}}
    request = Instance(request_type="generate_until", arguments=("", doc_to_messages, {"max_new_tokens": 4,
                       "temperature": 0}, 0, "handmade", "test"), idx=0, metadata={"task": "handmade",
                       "doc_id": 0, "repeats": 1})
    answer = client.generate_until([request])[0]
    text = getattr(answer, "text", answer)

    # the same question through the student's own processor and greedy decoding
    own = students.load(folder).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[sample["image"]], return_tensors="pt")
    with torch.no_grad():
        out = own.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=processor.tokenizer.eos_token_id,
                           pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    assert text and text == expected
