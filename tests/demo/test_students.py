"""The demo students' inference settings come from their recipes, and scoring a student
through StudentView (vision tower once, frames merged, TransV prompt length) equals scoring
the same rows from pixels by hand."""

import torch
from transformers import Qwen2_5_VLForConditionalGeneration

import linvid
from linvid.demo.students import InferenceSettings, StudentView, inference_settings
from linvid.distill.recipe import load_recipe
from linvid.eval.options import AnswerEncoder, answer_log_likelihoods, option_scores
from linvid.models.frame_tome import merged_video_batch
from linvid.models.transv import apply_transv
from linvid.niah import generate
from linvid.niah.teacher import build_tokenizer, teacher_config


def test_settings_follow_the_last_stage_of_each_recipe():
    assert inference_settings(load_recipe("demo_qwen_rwkv_vl")) == InferenceSettings()
    timeviper = inference_settings(load_recipe("demo_timeviper"))
    assert (timeviper.tokens_per_frame, timeviper.transv) == (2, True)
    aurora = inference_settings(load_recipe("demo_auroralong"))
    assert (aurora.prompt_style, aurora.keep_ratio, aurora.transv) == ("sandwich", 0.1, False)
    assert aurora.merges_frames and not InferenceSettings(keep_ratio=1.0).merges_frames


def test_student_view_scores_equal_the_pixel_path():
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    teacher = Qwen2_5_VLForConditionalGeneration(teacher_config(tokenizer)).eval()
    student = linvid.convert(teacher, "mamba2-hybrid-25").eval()
    apply_transv(student, "paper", init="transfer")
    for name, parameter in student.named_parameters():  # TransV drops tokens visibly
        if ".transv." in name and "alpha" in name:
            parameter.data.fill_(1.0)
    settings = InferenceSettings(tokens_per_frame=2, transv=True)
    sample = generate.make_sample("counting", 16, 5)
    scores = option_scores(
        student, tokenizer, sample, prompt=generate.prompt_text, prepare=StudentView(settings)
    )
    encoder = AnswerEncoder(tokenizer, student.config)
    video = encoder.video(sample.frames)
    text = generate.prompt_text(sample)
    expected = []
    with torch.no_grad():
        for option in sample.options:  # one row at a time, from pixels
            batch = encoder.batch([encoder.item(text, option, video, end_of_turn=False)])
            merged = merged_video_batch(student, batch, 2)
            prompt = int((merged["labels"][0] != -100).nonzero()[0])
            merged["transv_prompt_length"] = prompt
            expected.append(float(answer_log_likelihoods(student, merged)[0]))
    torch.testing.assert_close(scores, torch.tensor(expected), atol=1e-4, rtol=0)
    plain = option_scores(student, tokenizer, sample, prompt=generate.prompt_text)
    assert not torch.allclose(plain, scores, atol=1e-3)  # the view changes what is scored
