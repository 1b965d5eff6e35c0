"""ToMe inside a SigLIP vision tower (paper 001 §3.1-3.2, Algorithm 1, eq. 2): the merge
schedule, token counts per layer, exactness without merges and after removal, orders,
proportional attention against an unmerged model on exact duplicate tokens, batches, bf16."""

import pytest
import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.siglip.modeling_siglip import SiglipAttention, SiglipEncoderLayer

from linvid.models import tome_vit
from linvid.models.tome_vit import apply_tome, merge_schedule, patch_to_token_merge, remove_tome

PATCHES = 64  # 56 x 56 pixels in 7 x 7 patches: an 8 x 8 grid


def tiny_vision(num_layers=3, attention="sdpa", dtype=torch.float32):
    torch.manual_seed(0)
    config = SiglipVisionConfig(
        image_size=56,
        patch_size=7,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=2,
    )
    model = SiglipVisionModel(config).eval().to(dtype)
    model.set_attn_implementation(attention)
    return model


def pixels(batch=2, dtype=torch.float32, seed=1):
    return torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed)).to(dtype)


def test_schedule_constant_r_reaches_the_keep_ratio():
    # AuroraLong: SigLIP-L/16 at 384 px (576 patches) without its last layer, keep 10%.
    schedule = merge_schedule(576, 23, keep_ratio=0.1)
    assert schedule == [25] * 20 + [18, 0, 0]
    assert 576 - sum(schedule) == 58  # "less than 60 tokens" per frame (paper 001 §4.3.1)
    assert merge_schedule(64, 4, keep_ratio=0.25, skip_last=1) == [16, 16, 16, 0]
    assert 70 - sum(merge_schedule(70, 6, keep_ratio=0.1, skip_last=0)) == 7
    assert merge_schedule(64, 3, keep_ratio=1.0) == [0, 0, 0]
    assert merge_schedule(64, 3) == [32, 0, 0]  # one merging layer can only halve the tokens


def test_schedule_caps_r_at_half_the_mergeable_tokens():
    assert merge_schedule(64, 5, r=20) == [20, 20, 12, 0, 0]
    assert merge_schedule(65, 3, r=40, protected=1) == [32, 0, 0]
    assert merge_schedule(64, 2, r=5) == [0, 0]  # skip_last=2 leaves no merging layer
    assert merge_schedule(64, 2, r=5, skip_last=0) == [5, 5]


@torch.no_grad()
def test_token_counts_per_layer_follow_the_schedule():
    model = apply_tome(tiny_vision(num_layers=4, attention="eager"), keep_ratio=0.25, skip_last=1)
    output = model(pixels(), output_hidden_states=True, output_attentions=True)
    assert model.tome_state["schedule"] == [16, 16, 16, 0]
    assert [h.shape[1] for h in output.hidden_states] == [64, 48, 32, 16, 16]
    # Each layer attends over its input tokens; the merge follows the attention.
    assert [a.shape[-1] for a in output.attentions] == [64, 48, 32, 16]
    assert output.last_hidden_state.shape == (2, 16, 32)
    assert output.pooler_output.shape == (2, 32)
    size = model.tome_state["size"]
    assert size.shape == (2, 16)
    assert torch.equal(size.sum(dim=1), torch.full((2,), float(PATCHES)))
    assert len(model.tome_state["merges"]) == 3


@pytest.mark.parametrize("amount", [{"keep_ratio": 1.0}, {"r": 0}])
@torch.no_grad()
def test_no_merging_is_exactly_the_unpatched_model(amount):
    model = tiny_vision(attention="eager")
    reference = model(pixels(), output_hidden_states=True, output_attentions=True)
    apply_tome(model, **amount)
    output = model(pixels(), output_hidden_states=True, output_attentions=True)
    assert torch.equal(output.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(output.pooler_output, reference.pooler_output)
    for ours, theirs in zip(
        output.hidden_states + output.attentions,
        reference.hidden_states + reference.attentions,
        strict=True,
    ):
        assert torch.equal(ours, theirs)
    merge = patch_to_token_merge(model)
    assert torch.equal(merge.destination, torch.arange(PATCHES).repeat(2, 1))


@torch.no_grad()
def test_remove_tome_restores_exact_outputs_and_classes():
    model = tiny_vision(attention="eager")
    reference = model(pixels(), output_hidden_states=True)
    apply_tome(model)
    apply_tome(model, keep_ratio=0.5, order="descending")  # re-applying replaces the settings
    assert type(model.encoder.layers[0]).__name__ == "ToMeSiglipEncoderLayer"
    assert model.tome_state["order"] == "descending"
    merged = model(pixels(), output_hidden_states=True)
    assert merged.last_hidden_state.shape[1] == 32
    remove_tome(model)
    assert type(model.encoder.layers[0]) is SiglipEncoderLayer
    assert type(model.encoder.layers[0].self_attn) is SiglipAttention
    assert not hasattr(model, "tome_state")
    assert not any("_tome_state" in module.__dict__ for module in model.modules())
    output = model(pixels(), output_hidden_states=True)
    assert torch.equal(output.last_hidden_state, reference.last_hidden_state)
    assert torch.equal(output.pooler_output, reference.pooler_output)
    for ours, theirs in zip(output.hidden_states, reference.hidden_states, strict=True):
        assert torch.equal(ours, theirs)


@torch.no_grad()
def test_orders_sort_by_size_and_only_permute_the_tokens():
    outputs = {}
    for order in ("ascending", "descending", "none"):
        model = apply_tome(tiny_vision(), r=16, order=order)
        output = model(pixels())
        size = model.tome_state["size"]
        assert size.shape == (2, 48) and size.min() == 1 and size.max() >= 2
        outputs[order] = (
            patch_to_token_merge(model).unmerge(output.last_hidden_state),
            output.pooler_output,
            size,
        )
    ascending, descending, none = (outputs[o][2] for o in ("ascending", "descending", "none"))
    assert (ascending.diff(dim=1) >= 0).all()
    assert (descending.diff(dim=1) <= 0).all()
    # ToMe's own order: the 32 - 16 never-merged A tokens, then all of B.
    assert (none[:, :16] == 1).all() and not (none.diff(dim=1) >= 0).all()
    # With one merging layer the three orders merge the same tokens; the layers after it are
    # permutation-equivariant, so every patch gets the same output features.
    for order in ("descending", "none"):
        torch.testing.assert_close(outputs[order][0], outputs["ascending"][0])
        torch.testing.assert_close(outputs[order][1], outputs["ascending"][1])


def twin_patch_model_and_pixels(attention):
    """A float64 model and images whose patches come in identical horizontal pairs (2k, 2k+1),
    position embeddings included, so the pairs are exact duplicate tokens in every layer."""
    model = tiny_vision(attention=attention, dtype=torch.float64)
    with torch.no_grad():
        position = model.embeddings.position_embedding.weight
        position[1::2] = position[0::2]
    images = pixels(dtype=torch.float64)
    columns = images.view(2, 3, 56, 8, 7)  # patch column x covers pixels 7x .. 7x + 6
    columns[:, :, :, 1::2] = columns[:, :, :, 0::2]
    return model, images


# SigLIP's eager attention takes its softmax in float32 even for a float64 model.
@pytest.mark.parametrize(("attention", "tolerance"), [("eager", 1e-6), ("sdpa", 1e-10)])
@torch.no_grad()
def test_proportional_attention_makes_a_merged_twin_attend_like_two_tokens(
    attention, tolerance, monkeypatch
):
    model, images = twin_patch_model_and_pixels(attention)
    reference = model(images)
    # Layer 0 merges half of the 32 twin pairs (each A token's best B match is its twin), so
    # sizes 1 and 2 mix and the log(size) bias is not a constant shift of the logits.
    apply_tome(model, r=16)
    merged = model(images)
    merge = patch_to_token_merge(model)
    assert set(model.tome_state["size"].unique().tolist()) == {1.0, 2.0}
    twins_merged = merge.destination[:, 0::2] == merge.destination[:, 1::2]
    assert twins_merged.sum(dim=1).tolist() == [16, 16]  # every merge joined a twin pair
    torch.testing.assert_close(
        merge.unmerge(merged.last_hidden_state), reference.last_hidden_state, rtol=0, atol=tolerance
    )
    torch.testing.assert_close(
        merged.pooler_output, reference.pooler_output, rtol=0, atol=tolerance
    )

    # Without the bias the same merge no longer reproduces the unmerged model.
    monkeypatch.setattr(
        tome_vit,
        "proportional_attention_bias",
        lambda size: size.new_zeros(size.shape)[:, None, None],
    )
    unbiased = model(images)
    assert (
        merge.unmerge(unbiased.last_hidden_state) - reference.last_hidden_state
    ).abs().max() > 1e-3


@torch.no_grad()
def test_protected_tokens_never_merge_and_stay_first():
    model = apply_tome(tiny_vision(num_layers=4), r=40, protected=1, skip_last=1)
    model(pixels())
    merge = patch_to_token_merge(model)
    assert model.tome_state["schedule"] == [31, 16, 8, 0]
    assert (merge.destination[:, 0] == 0).all() and (merge.destination[:, 1:] != 0).all()
    assert (merge.size[:, 0] == 1).all()


@torch.no_grad()
def test_batch_elements_merge_independently():
    model = apply_tome(tiny_vision(num_layers=4), keep_ratio=0.2, skip_last=1)
    images = pixels(batch=3)
    batched = model(images)
    batched_size = model.tome_state["size"]
    assert batched.last_hidden_state.shape == (3, 13, 32)
    for index in range(3):
        single = model(images[index : index + 1])
        torch.testing.assert_close(single.last_hidden_state[0], batched.last_hidden_state[index])
        torch.testing.assert_close(single.pooler_output[0], batched.pooler_output[index])
        assert torch.equal(model.tome_state["size"][0], batched_size[index])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@torch.no_grad()
def test_bfloat16(attention):
    model = tiny_vision(num_layers=4, attention=attention, dtype=torch.bfloat16)
    images = pixels(batch=3, dtype=torch.bfloat16)
    reference = model(images)
    apply_tome(model, keep_ratio=1.0)
    assert torch.equal(model(images).last_hidden_state, reference.last_hidden_state)
    apply_tome(model, keep_ratio=0.1)
    output = model(images)
    assert output.last_hidden_state.dtype == torch.bfloat16
    assert output.last_hidden_state.shape == (3, 16, 32)  # two merging layers: 64 -> 32 -> 16
    assert (
        torch.isfinite(output.last_hidden_state).all()
        and torch.isfinite(output.pooler_output).all()
    )
    assert model.tome_state["size"].dtype == torch.float32
    assert torch.equal(model.tome_state["size"].sum(dim=1), torch.full((3,), float(PATCHES)))


def test_training_backward_reaches_every_layer():
    model = apply_tome(tiny_vision(num_layers=4).train(), keep_ratio=0.25, skip_last=1)
    model(pixels()).pooler_output.square().sum().backward()
    for layer in model.encoder.layers:
        assert layer.self_attn.q_proj.weight.grad.abs().sum() > 0
        assert layer.mlp.fc1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"keep_ratio": 0}, "keep_ratio"),
        ({"keep_ratio": -0.5}, "keep_ratio"),
        ({"keep_ratio": 1.5}, "keep_ratio"),
        ({"keep_ratio": "half"}, "keep_ratio"),
        ({"r": -1}, "r must be"),
        ({"r": 2.5}, "r must be"),
        ({"keep_ratio": 0.5, "r": 4}, "not both"),
        ({"order": "random"}, "order"),
        ({"protected": -1}, "protected"),
        ({"skip_last": -1}, "skip_last"),
    ],
)
def test_bad_arguments_name_the_argument(arguments, message):
    model = tiny_vision()
    with pytest.raises(ValueError, match=message):
        apply_tome(model, **arguments)
    assert not hasattr(model, "tome_state")


def test_misuse_errors():
    with pytest.raises(ValueError, match="SigLIP vision model"):
        apply_tome(nn.Linear(2, 2))
    model = tiny_vision()
    with pytest.raises(ValueError, match="no ToMe patch"):
        remove_tome(model)
    apply_tome(model)
    with pytest.raises(ValueError, match="run once"):
        patch_to_token_merge(model)
    model.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model.train()(pixels())
    model.eval().config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation"):
        model(pixels())


@torch.no_grad()
def test_hidden_states_selected_by_index_as_llava_does():
    # LLaVA-style VLMs ask their SigLIP tower for one hidden state by (negative) index.
    model = apply_tome(tiny_vision(num_layers=4), keep_ratio=0.25)
    output = model(pixels(), output_hidden_states=[-1, -2])
    counts = [None if h is None else h.shape[1] for h in output.hidden_states]
    assert counts == [None, None, None, 16, 16] and model.tome_state["schedule"] == [32, 16, 0, 0]
