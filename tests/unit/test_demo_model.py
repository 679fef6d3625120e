"""The benchmark's model and data (grokwatch/demo): the fast paths compute the same function as the plain ones."""

import pytest
import torch

from grokwatch.demo.data import make_dataset
from grokwatch.demo.model import GrokMoE, ModelConfig
from grokwatch.demo.train import answer_loss


def _pair(**kw):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, num_outputs=11, hidden=32, expert_hidden=8, num_experts=16, top_k=2,
                      shared_expert_hidden=0, route_all_positions=True, **kw)
    dense = GrokMoE(cfg)
    sparse = GrokMoE(ModelConfig(**{**cfg.__dict__, "sparse_experts": True}))
    sparse.load_state_dict(dense.state_dict())
    return dense, sparse


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_sparse_experts_equal_the_dense_masked_form_forward_and_backward(top_k):
    torch.manual_seed(1)
    dense, sparse = _pair()
    for m in (dense, sparse):
        for b in m.blocks:
            b.top_k = top_k
    ids = torch.randint(0, 50, (7, 40))
    out_d, out_s = dense(ids), sparse(ids)
    torch.testing.assert_close(out_s, out_d, rtol=1e-5, atol=1e-5)
    out_d.square().sum().backward()
    out_s.square().sum().backward()
    for (name, pd), ps in zip(dense.named_parameters(), sparse.parameters()):
        torch.testing.assert_close(ps.grad, pd.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_k_equation_rows_are_k_independent_equations():
    """A row of k equations gives the same logits as the k equations one a row (attention stays within one)."""
    dense, _ = _pair(router_scale=8.0)
    ids = torch.randint(0, 50, (3, 5 * 4))
    ids.view(12, 5)[:, 4] %= 11  # answers are residues
    torch.testing.assert_close(dense(ids), dense(ids.reshape(12, 5)))
    loss = answer_loss(dense, ids)
    assert loss.shape == (3,)
    per_eq = torch.nn.functional.cross_entropy(dense(ids.reshape(12, 5)), ids.reshape(12, 5)[:, 4], reduction="none")
    torch.testing.assert_close(loss, per_eq.view(3, 4).mean(1))


def test_a_wide_row_without_every_position_routed_is_refused():
    torch.manual_seed(0)
    model = GrokMoE(ModelConfig(vocab_size=50, num_outputs=11, hidden=32, expert_hidden=8))
    with pytest.raises(ValueError, match="route_all_positions"):
        model(torch.randint(0, 50, (2, 10)))


def test_k_equation_samples_hold_each_training_equation_once_and_one_group_each():
    data = make_dataset(["add", "rand"], p=11, train_fraction=0.3, seed=0, equations_per_sample=4)
    s = data.samples
    assert s.ids_NW.shape[1] == 20
    assert s.ids_NW.reshape(-1, 5).tolist() == data.train.ids_B5.tolist()
    ops = s.ids_NW.reshape(len(s.sample_ids), 4, 5)[:, :, 1]
    assert (ops == ops[:, :1]).all()  # one operation token a sample
    assert [sid.split(":")[0] for sid in s.sample_ids] == [data.groups[g] for g in s.group_N.tolist()]
    assert len(set(s.sample_ids)) == len(s.sample_ids)
    assert make_dataset(["add"], 11, 0.3, 0).samples.ids_NW.shape[1] == 5
