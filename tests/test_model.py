"""The tokenizer and the model: BabyGPT computes the seed's function and generates as the seed's model does."""

import math

import pytest
import torch
import torch.nn.functional as F

import babygpt
import reference
from conftest import corpus_data_for, make_corpus, seed_and_baby, tiny_model


# -----------------------------------------------------------------------------
# Tokenizer

def test_tokenizer_round_trip_and_vocabulary():
    """Every character of the text gets one id and decodes back to itself: no poem comes out garbled."""
    text = make_corpus()
    tok = babygpt.Tokenizer(text)
    assert tok.chars == sorted(set(text))
    assert len(tok.chars) == len(set(tok.chars)) == tok.vocab_size
    ids = tok.encode(text)
    assert len(ids) == len(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids[:50])) == text[:50]  # tensors of ids decode too
    assert all(tok.itos[tok.stoi[c]] == c for c in tok.chars)
    assert tok.encode("") == []


def test_tokenizer_names_the_characters_it_has_never_seen_in_the_order_typed():
    """The prompt checks name the characters a prompt must change, in the order typed, each once."""
    tok = babygpt.Tokenizer("春江潮水")
    assert tok.unknown("春雪江月雪") == ["雪", "月"]


# -----------------------------------------------------------------------------
# The model computes the seed's function

@pytest.mark.parametrize("vocab,block,embed,heads,layers,B,T", [
    (11, 8, 16, 1, 1, 2, 8),
    (37, 16, 32, 4, 2, 3, 16),
    (64, 32, 48, 6, 3, 2, 20),   # T < block_size
    (23, 12, 24, 3, 2, 1, 1),    # a single token
])
def test_logits_equal_seed_reference_fp32(vocab, block, embed, heads, layers, B, T):
    """The seed's weights give the seed's logits and loss here: the fused attention is the same function."""
    ref, baby = seed_and_baby(vocab, block, embed, heads, layers)
    idx = torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(vocab, (B, T), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, want_loss = ref(idx, targets)
        got, got_loss = baby(idx, targets)
    assert got.shape == want.shape == (B, T, vocab)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert abs(got_loss.item() - want_loss.item()) < 1e-5


def test_fp32_sdpa_matches_reference_at_seed_architecture():
    """At the seed's own shape (6 layers, 6 heads, 384 wide) and a full block of 256, the logits are the seed's."""
    ref, baby = seed_and_baby(100, 256, 384, 6, 6)
    idx = torch.randint(100, (2, 256), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(idx)[0], baby(idx)[0]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_fp32_gradients_match_reference():
    """Training moves the weights as the seed's model would: the gradients of every weight agree."""
    ref, baby = seed_and_baby(23, 8, 32, 4, 2, seed=7)
    idx = torch.randint(23, (4, 8), generator=torch.Generator().manual_seed(0))
    tgt = torch.randint(23, (4, 8), generator=torch.Generator().manual_seed(1))
    ref(idx, tgt)[1].backward()
    baby(idx, tgt)[1].backward()
    fused = babygpt.fused_layout({k: p.grad for k, p in ref.named_parameters()})
    for name, p in baby.named_parameters():
        torch.testing.assert_close(p.grad, fused[name], rtol=1e-4, atol=1e-6, msg=name)


def test_forward_shapes_loss_and_cropping():
    """A text longer than block_size is cropped to its last block_size characters, and the loss is the
    mean cross-entropy near log(vocab) before training."""
    torch.manual_seed(0)
    vocab, block = 17, 8
    model = babygpt.BabyGPT(vocab, block_size=block, n_embed=16, n_head=2, n_layer=2, dropout=0.0).eval()
    idx = torch.randint(vocab, (3, block + 5))
    targets = torch.randint(vocab, (3, block + 5))
    with torch.no_grad():
        logits, loss = model(idx)
        assert loss is None
        assert logits.shape == (3, block, vocab)
        cropped, _ = model(idx[:, -block:])
        torch.testing.assert_close(logits, cropped, rtol=0, atol=0)
        logits, loss = model(idx, targets)
    assert loss.dim() == 0
    expected = F.cross_entropy(logits.reshape(-1, vocab), targets[:, -block:].reshape(-1))
    assert abs(loss.item() - expected.item()) < 1e-6
    assert abs(loss.item() - torch.log(torch.tensor(float(vocab))).item()) < 1.0


# -----------------------------------------------------------------------------
# Generation and the KV cache

def test_generate_restores_training_mode():
    """Generating in the middle of training (the wandb samples) leaves dropout on for the steps after it."""
    model = babygpt.BabyGPT(11, block_size=8, n_embed=16, n_head=2, n_layer=1, dropout=0.1)
    model.train()
    out = model.generate(torch.zeros((1, 1), dtype=torch.long), 5)
    assert out.shape == (1, 6) and all(m.training for m in model.modules())
    assert int(out.min()) >= 0 and int(out.max()) < 11


@pytest.mark.parametrize("prompt_len,new", [(4, 8), (4, 50), (16, 10), (20, 30)],
                         ids=["short", "past_block", "full_block_prompt", "prompt_past_block"])
def test_kv_cache_greedy_is_exact(prompt_len, new):
    """Greedy text is the seed model's, with the cache or without, also once the text outgrows block_size."""
    vocab = 40
    seed_model = tiny_model(vocab, seed=1, cls=reference.SeedGPT).eval()
    model = babygpt.BabyGPT(vocab, block_size=16, n_embed=32, n_head=2, n_layer=2, dropout=0.0).eval()
    model.load_state_dict(babygpt.fused_layout(seed_model.state_dict()))  # the seed layout
    g = torch.Generator().manual_seed(prompt_len * 100 + new)
    idx = torch.randint(vocab, (2, prompt_len), generator=g)

    cached = model.generate(idx, new, temperature=0, kv_cache=True)
    plain = model.generate(idx, new, temperature=0, kv_cache=False)
    seed_out = seed_model.generate(idx, new, temperature=0)
    assert cached.shape == (2, prompt_len + new)
    assert torch.equal(cached[:, :prompt_len], idx)
    assert torch.equal(cached, plain), "KV cache changes greedy output"
    assert torch.equal(cached, seed_out), "greedy output differs from the seed model's"
    assert len(set(cached[:, prompt_len:].flatten().tolist())) > 1  # not a degenerate case


def test_kv_cache_is_used_while_text_fits():
    """With the cache each new character costs one token's work, not the whole text's again."""
    model = tiny_model(40, seed=2).eval()
    idx = torch.randint(40, (2, 4), generator=torch.Generator().manual_seed(0))
    count = [0]
    handle = model.token_embedding_table.register_forward_hook(
        lambda mod, inp, out: count.__setitem__(0, count[0] + inp[0].numel()))
    model.generate(idx, 10, temperature=0, kv_cache=True)
    with_cache = count[0]
    count[0] = 0
    model.generate(idx, 10, temperature=0, kv_cache=False)
    handle.remove()
    assert with_cache <= 2 * (4 + 10)  # the prompt, then one token per step
    assert count[0] > with_cache


def test_sampling_with_the_kv_cache_draws_the_same_text():
    """--kv_cache=false and true give the same sampled text for the same random draws."""
    torch.manual_seed(4)
    model = babygpt.BabyGPT(20, block_size=8, n_embed=16, n_head=2, n_layer=2, dropout=0.0).eval()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    outs = [model.generate(idx, 12, temperature=1.0, kv_cache=cache, generator=torch.Generator().manual_seed(9))
            for cache in (True, False)]
    assert torch.equal(outs[0], outs[1])


def test_greedy_generation_is_the_same_with_every_attention_backend():
    """The math and flash attention kernels write the same greedy text, cached or not, past block_size."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    vocab, data = corpus_data_for(make_corpus())
    model = tiny_model(vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(30):  # a little training, so greedy picks are not near-ties
        babygpt.train_step(model, opt, [babygpt.get_batch(data["train"], 8, 16)])
    idx = data["val"][:5].view(1, 5)
    outs = {}
    for name, backend in (("math", SDPBackend.MATH), ("flash", SDPBackend.FLASH_ATTENTION)):
        for cache in (True, False):
            with sdpa_kernel([backend]):
                outs[name, cache] = model.generate(idx, 25, temperature=0, kv_cache=cache)
    first = next(iter(outs.values()))
    assert all(torch.equal(first, o) for o in outs.values()), outs


def test_top_k_draws_only_and_all_of_the_k_likeliest():
    """--top_k=3 never writes a character outside the 3 likeliest, and does write each of them."""
    logits = torch.tensor([[3.0, 2.9, 0.5, 2.8, -1.0, 2.7]]).repeat(4000, 1)
    drawn = babygpt.sample_next(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (4000, 1)
    assert set(drawn.flatten().tolist()) == {0, 1, 3}
    greedy = babygpt.sample_next(logits[:2], temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert greedy.flatten().tolist() == [0, 0]


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_divides_the_logits(temperature):
    """--temperature=0.5 makes the likeliest character likelier and 2.0 less likely, by the softmax of logits / T."""
    logits = torch.tensor([[0.0, math.log(3.0)]]).repeat(20000, 1)  # p(1) = 3/4 at temperature 1
    drawn = babygpt.sample_next(logits, temperature=temperature, generator=torch.Generator().manual_seed(0))
    want = 3 ** (1 / temperature) / (1 + 3 ** (1 / temperature))
    assert drawn.float().mean().item() == pytest.approx(want, abs=0.015)
