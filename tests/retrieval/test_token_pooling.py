"""Token pooling of multi-vector page embeddings: what it keeps, what it counts, and through `evaluate`."""

import pytest
import torch
import torch.nn.functional as F

from tests.retrieval.conftest import make_retriever
from vlmkit.cli import main
from vlmkit.data.page_store import PageStore
from vlmkit.errors import ConfigError
from vlmkit.eval import retrieval as ev
from vlmkit.eval.token_pooling import pool_page_tokens
from vlmkit.model.retriever import score


def unit_vectors(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def real_tokens(embeddings: torch.Tensor) -> list[int]:
    """Non-padding (non-zero) vectors per page."""
    return (embeddings.abs().sum(-1) != 0).sum(-1).tolist()


def test_factor_one_returns_the_input_itself():
    pages = unit_vectors(12).view(2, 6, 8)
    assert pool_page_tokens(pages, 1, normalize=True) is pages


@pytest.mark.parametrize("normalize", [True, False])
def test_copies_of_distinct_vectors_pool_to_those_vectors_and_keep_maxsim(normalize):
    distinct, copies = unit_vectors(4), 3
    order = torch.randperm(4 * copies, generator=torch.Generator().manual_seed(1))
    page = distinct.repeat(copies, 1)[order].unsqueeze(0)  # (1, 12, 8): every vector 3 times, shuffled

    pooled = pool_page_tokens(page, copies, normalize)

    assert pooled.shape == (1, 4, 8)
    # Up to order: each pooled vector is one of the distinct ones, and each distinct one is there.
    match = (pooled[0] @ distinct.T).argmax(dim=1)
    assert sorted(match.tolist()) == [0, 1, 2, 3]
    torch.testing.assert_close(pooled[0], distinct[match])
    queries = unit_vectors(5 * 3, seed=2).view(5, 3, 8)
    torch.testing.assert_close(score(queries, pooled), score(queries, page))


def test_padding_stays_padding_and_is_not_counted():
    pages = unit_vectors(32).view(2, 16, 8).clone()
    pages[0, 10:] = 0  # page 0: 10 tokens, then 6 padding rows

    pooled = pool_page_tokens(pages, 2, normalize=True)

    assert pooled.shape == (2, 8, 8) and real_tokens(pooled) == [5, 8]
    assert torch.all(pooled[0, 5:] == 0)
    torch.testing.assert_close(pooled[0, :5].norm(dim=-1), torch.ones(5))


@pytest.mark.parametrize("factor", [2, 3, 4, 20])
def test_pooled_token_count_is_tokens_over_factor(factor):
    page = unit_vectors(17).unsqueeze(0)
    assert real_tokens(pool_page_tokens(page, factor, normalize=True)) == [max(1, 17 // factor)]


def test_bad_factors_and_single_vectors_are_refused():
    single = unit_vectors(6)  # (pages, dim): one vector a page
    assert pool_page_tokens(single, 1, normalize=True) is single
    with pytest.raises(ConfigError, match=r"needs multi-vector page embeddings .*multi_vector_dim"):
        pool_page_tokens(single, 2, normalize=True)
    with pytest.raises(ConfigError, match="must be at least 1"):
        pool_page_tokens(single.view(2, 3, 8), 0, normalize=True)


def test_evaluate_pools_the_pages_it_searches(pairs, docs_dir, tmp_path, monkeypatch):
    model, processor = make_retriever([p.query for p in pairs], multi_vector_dim=8)
    monkeypatch.setattr(ev, "load_retriever", lambda directory: (model.eval(), processor))
    searched, real_search = [], ev.search

    def recording_search(queries, docs, k):  # keeps the page embeddings each evaluation searched
        searched.append(docs)
        return real_search(queries, docs, k)

    monkeypatch.setattr(ev, "search", recording_search)
    args = ("model", docs_dir / "test_docs.h5", docs_dir / "test_queries.jsonl", docs_dir / "test_qrels.tsv")

    whole = ev.evaluate(*args, batch_size=8, progress=False)
    pooled = ev.evaluate(*args, batch_size=8, progress=False, pool_factor=2)

    assert set(pooled) == set(whole) and 0 <= pooled["ndcg@10"] <= 1
    tokens, pooled_tokens = real_tokens(searched[0]), real_tokens(searched[1])
    assert pooled_tokens == [n // 2 for n in tokens]
    assert min(tokens) > 2 and searched[1].numel() < searched[0].numel()
    with pytest.raises(ConfigError, match="not a loaded --index"):  # it may be pooled already
        ev.evaluate(*args, index=tmp_path / "pooled.safetensors", pool_factor=2)
    with pytest.raises(ConfigError, match="--mode lexical has none"):
        ev.evaluate(None, *args[1:], mode="lexical", pool_factor=2)


def test_index_and_eval_commands_take_a_pool_factor(pairs, docs_dir, tmp_path, capsys):
    model_dir, index = tmp_path / "model", tmp_path / "index.safetensors"
    model, processor = make_retriever([p.query for p in pairs], multi_vector_dim=8)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    store = str(docs_dir / "test_docs.h5")
    index_command = ["retriever", "index", "--model", str(model_dir), "--docs", store, "--out", str(index)]

    assert main([*index_command, "--pool-factor", "3"]) == 0
    ids, pooled = ev.load_index(index)
    assert ids == PageStore(store).ids and f"embeddings {tuple(pooled.shape)}" in capsys.readouterr().out
    eval_command = ["retriever", "eval", "--model", str(model_dir), "--docs", store, "--queries",
                    str(docs_dir / "test_queries.jsonl"), "--qrels", str(docs_dir / "test_qrels.tsv")]
    assert main([*eval_command, "--pool-factor", "3", "--output", str(tmp_path / "m.json")]) == 0
    assert main([*eval_command, "--index", str(index), "--output", str(tmp_path / "i.json")]) == 0
    # Pooling at `eval` and searching an index pooled at `index` are the same search.
    assert (tmp_path / "m.json").read_text() == (tmp_path / "i.json").read_text()
    assert main([*index_command, "--pool-factor", "0"]) == 2
    assert "must be at least 1" in capsys.readouterr().err
