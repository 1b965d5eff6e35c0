"""Sequence-level KD (paper 003 eq. 8) on image conversations (issue 14: LLaVA-OneVision
images in linmu's LoRA stage): the teacher answers each sample's first question with the
images whose placeholders are in that question only, and the returned inputs run through a
model (every image and video of the batch accounted for)."""

import torch
from test_data_images import config, data_dir, make_dataset, model, processor  # noqa: F401

from linvid.distill.data import IGNORE_INDEX, model_inputs, sample_visual_inputs
from linvid.distill.trainer import teacher_decode_batch

# Images in the first question of each record of test_data_images.RECORDS (the fourth has its
# second image in a later turn); the third record is a video.
FIRST_QUESTION_IMAGES = [1, 2, 0, 1]


def test_teacher_answers_the_first_question_with_its_own_images(data_dir, processor, config, model):  # noqa: F811
    dataset = make_dataset(data_dir, processor.tokenizer, config)
    batch = dataset.collate([dataset[index] for index in range(len(FIRST_QUESTION_IMAGES))])
    decodes = {}
    with torch.no_grad():
        sequence = teacher_decode_batch(model, batch, decodes, dataset)
        grids = sequence.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
        assert len(grids) == sum(FIRST_QUESTION_IMAGES)
        logits = model(**{k: v for k, v in sequence.items() if k != "labels"}).logits
    assert torch.isfinite(logits).all()
    inputs = model_inputs(batch)
    for position, images in enumerate(FIRST_QUESTION_IMAGES):
        answer = (inputs["labels"][position] != IGNORE_INDEX).nonzero()[0]
        prompt = inputs["input_ids"][position, :answer]
        visual = sample_visual_inputs(batch, position)
        if images:  # by hand: the first `images` images and their pixel rows
            grid = visual["image_grid_thw"][:images]
            visual["image_grid_thw"] = grid
            visual["pixel_values"] = visual["pixel_values"][: int(grid.prod(-1).sum())]
        with torch.no_grad():
            alone = model.generate(
                input_ids=prompt[None],
                attention_mask=torch.ones_like(prompt)[None],
                mm_token_type_ids=inputs["mm_token_type_ids"][position, :answer][None],
                **visual,
                max_new_tokens=len(decodes[int(batch["sample_index"][position])]),
                do_sample=False,
                suppress_tokens=[
                    getattr(model.config, f"{name}_token_id")
                    for name in ("image", "video", "vision_start", "vision_end")
                ],
                eos_token_id=dataset.end_of_turn_id,
                pad_token_id=dataset.pad_token_id,
            )[0, len(prompt) :].tolist()
        decoded = decodes[int(batch["sample_index"][position])]
        assert alone[: len(decoded)] == decoded, position
        labels = sequence["labels"][position]
        assert labels[labels != IGNORE_INDEX].tolist() == decoded
