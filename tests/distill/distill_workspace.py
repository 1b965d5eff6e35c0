"""A tiny teacher with its tokenizer and a few generated videos with a conversation JSONL,
written into a folder: what the trainer tests distill from."""

import json

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from linvid.models.tiny import tiny_qwen2_5_vl_config
from linvid.models.tokenizer import build_word_tokenizer, token_ids
from linvid.video.io import write_video

WORDS = "what is here a red blue green ball cat sits which colour yes no".split()
COLOURS = {"red": (200, 20, 20), "blue": (20, 20, 200), "green": (20, 200, 20)}


def write_workspace(root, *, num_layers=2, answer_choice=lambda index: index % 3):
    """Write root/teacher (model + tokenizer), root/<i>.mp4 and root/train.jsonl; each of the
    six samples answers with one of three answers of different lengths, picked by
    answer_choice(index). Returns the JSONL records."""
    tokenizer = build_word_tokenizer(WORDS)
    torch.manual_seed(0)
    config = tiny_qwen2_5_vl_config(num_layers=num_layers, token_ids=token_ids(tokenizer))
    teacher = Qwen2_5_VLForConditionalGeneration(config)
    teacher.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    records = []
    for index, (name, colour) in enumerate(list(COLOURS.items()) * 2):
        frames = torch.zeros(4, 3, 56, 56, dtype=torch.uint8)
        frames += torch.tensor(colour, dtype=torch.uint8).view(1, 3, 1, 1)
        frames[:, :, index * 6 : index * 6 + 12, 8:28] = 255
        write_video(root / f"{index}.mp4", frames, fps=4)
        answers = ["yes", f"a {name} ball", f"which {name} cat sits here"]
        records.append(
            {
                "video": f"{index}.mp4",
                "conversations": [
                    {"from": "human", "value": "<video>\nwhat is here"},
                    {"from": "gpt", "value": answers[answer_choice(index)]},
                ],
            }
        )
    with open(root / "train.jsonl", "w") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    return records
