"""Fidelity of CAUSE's losses against a literal transcription of the reference code on identical tensors.

Transcribed from ByungKwanLee/Causal-Unsupervised-Segmentation at commit
ee0aa8478a6b6704f4db44ecc70e44a14fe5067f, ``modules/segment_module.py``: ``transform``, ``untransform``,
``flatten``, ``stochastic_sampling``, ``cos_distance_matrix``, ``codebook_index``, ``quantize_index``,
``vqt``, ``get_modularity_matrix_and_edge``, ``cluster_assignment_matrix``,
``compute_modularity_based_codebook``, ``ema_update`` and the ``Cluster`` methods ``bank_init``,
``bank_update``, ``bank_compute`` and ``contrastive_ema_with_codebook_bank``. The only edits: ``.cuda()``
removed (CPU), the ``Cluster`` methods as functions of a small state object, and ``torch.randperm`` in
``bank_update`` given the same generator our bank draws from (the reference draws from the global RNG: the
same Mersenne-Twister stream when seeded alike). Tolerance: 1e-5 relative in float64 (the computations
differ in order: ours is batched and chunked).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import cat
from torch import randperm as perm

from usseg_core.heads.cause import (CauseConfig, ConceptBank, concept_index, ema_update, front_door_loss,
                                    grid_sample, modularity_loss, tokens)

RTOL = 1e-5


# ------------------------------- transcription (reference code, see the module docstring) ----------------

def transform(x):
    B, P, D = x.shape
    return x.permute(0, 2, 1).view(B, D, int(math.sqrt(P)), int(math.sqrt(P)))


def untransform(x):
    B, D, P, P = x.shape
    return x.view(B, D, -1).permute(0, 2, 1)


def flatten(x):
    B, P, D = x.shape
    return x.contiguous().view(B*P, D)


def stochastic_sampling(x, order=None, k=4):
    x = transform(x)
    x_patch = x.unfold(2, k, k).unfold(3, k, k)
    x_patch = x_patch.permute(0, 2, 3, 4, 5, 1)
    x_patch = x_patch.reshape(-1, x_patch.shape[3:5].numel(), x_patch.shape[5])

    if order==None: order = torch.randint(k ** 2, size=(x_patch.shape[0],))

    x_patch = x_patch[range(x_patch.shape[0]), order].reshape(x.shape[0], x.shape[2]//k, x.shape[3]//k, -1)
    x_patch = x_patch.permute(0, 3, 1, 2)
    x = untransform(x_patch)
    return x, order


def cos_distance_matrix(z, c):
    z_flattened = z.contiguous().view(-1, z.shape[-1])
    norm_z = F.normalize(z_flattened, dim=1)
    norm_embed = F.normalize(c, dim=1)
    return torch.einsum("ab,cb->ac", norm_z, norm_embed).view(*z.shape[:-1], -1)


def quantize_index(z, c, mode='cos'):
    dist = cos_distance_matrix(z, c)
    return dist.argmax(dim=2)


def codebook_index(z, c):
    dist = cos_distance_matrix(z, c)
    return dist.argmax(dim=2)


def vqt(z, c):
    codebook_ind = codebook_index(z, c)
    return c[codebook_ind].view(*z.shape[:-1], c.shape[1])


def ref_ema_update(x, x_ema, lamb=0.99):
    for student_params, teacher_params in zip(x.parameters(), x_ema.parameters()):
        teacher_params.data = lamb * teacher_params.data + (1-lamb) * student_params.data


def get_modularity_matrix_and_edge(x, mode='cos'):
    norm = F.normalize(x, dim=2)
    A = (norm @ norm.transpose(2, 1)).clamp(0)
    A = A - A * torch.eye(A.shape[1], dtype=A.dtype)
    d = A.sum(dim=2, keepdims=True)
    e = A.sum(dim=(1, 2), keepdims=True)
    W = A - (d / e) @ (d.transpose(2, 1) / e) * e
    return W, e


def cluster_assignment_matrix(z, c):
    norm_z = F.normalize(z, dim=2)
    norm_c = F.normalize(c, dim=1)
    return (norm_z @ norm_c.unsqueeze(0).transpose(2, 1)).clamp(0)


def compute_modularity_based_codebook(c, x, temp=0.1, grid=False):
    x = x.detach()
    if grid: x, _ = stochastic_sampling(x)
    W, e = get_modularity_matrix_and_edge(x)
    C = cluster_assignment_matrix(x, c)
    D = C.transpose(2, 1)
    E = torch.tanh(D.unsqueeze(3) @ D.unsqueeze(2) / temp)
    delta, _ = E.max(dim=1)
    Q = (W / e) @ delta
    diag = Q.diagonal(offset=0, dim1=-2, dim2=-1)
    trace = diag.sum(dim=-1)
    return -trace.mean()


class RefCluster:
    """The state of the reference's ``Cluster`` that its bank methods read."""

    def __init__(self, codebook, projection_dim, dim):
        self.codebook, self.projection_dim, self.dim = codebook, projection_dim, dim
        self.num_codebook = codebook.shape[0]

    def bank_init(self):
        self.prime_bank = {}
        start_of_tensor = torch.empty([0, self.projection_dim], dtype=self.codebook.dtype)
        for i in range(self.num_codebook):
            self.prime_bank[i] = start_of_tensor

    def bank_update(self, feat, proj_feat_ema, max_num=100, generator=None):
        quant_ind = quantize_index(feat, self.codebook)
        for i in quant_ind.unique():
            key = proj_feat_ema[torch.where(quant_ind == i)]
            key = key[perm(len(key), generator=generator)][:int(len(key)*0.5)]
            self.prime_bank[i.item()] = cat([self.prime_bank[i.item()], key], dim=0)
            length = len(self.prime_bank[i.item()])
            if length >= max_num:
                self.prime_bank[i.item()] = self.prime_bank[i.item()][length-max_num:]

    def bank_compute(self):
        bank_vq_feat = torch.empty([0, self.dim], dtype=self.codebook.dtype)
        bank_proj_feat_ema = torch.empty([0, self.projection_dim], dtype=self.codebook.dtype)
        for key in self.prime_bank.keys():
            num = self.prime_bank[key].shape[0]
            if num == 0: continue
            bank_vq_feat = cat([bank_vq_feat, self.codebook[key].unsqueeze(0).repeat(num, 1)], dim=0)
            bank_proj_feat_ema = cat([bank_proj_feat_ema, self.prime_bank[key]], dim=0)
        self.flat_norm_bank_vq_feat = F.normalize(bank_vq_feat, dim=1)
        self.flat_norm_bank_proj_feat_ema = F.normalize(bank_proj_feat_ema, dim=1)

    def contrastive_ema_with_codebook_bank(self, feat, proj_feat, proj_feat_ema, temp=0.07, pos_thresh=0.3, neg_thresh=0.1):
        vq_feat = vqt(feat, self.codebook)
        norm_vq_feat = F.normalize(vq_feat, dim=2)
        flat_norm_vq_feat = flatten(norm_vq_feat)
        norm_proj_feat = F.normalize(proj_feat, dim=2)
        norm_proj_feat_ema = F.normalize(proj_feat_ema, dim=2)
        flat_norm_proj_feat_ema = flatten(norm_proj_feat_ema)
        loss_NCE_list = []
        for batch_ind in range(proj_feat.shape[0]):
            anchor_vq_feat = norm_vq_feat[batch_ind]
            anchor_proj_feat = norm_proj_feat[batch_ind]
            cs_st = anchor_proj_feat @ flat_norm_proj_feat_ema.T
            codebook_distance = anchor_vq_feat @ flat_norm_vq_feat.T
            bank_codebook_distance = anchor_vq_feat @ self.flat_norm_bank_vq_feat.T
            pos_mask = (codebook_distance > pos_thresh)
            neg_mask = (codebook_distance < neg_thresh)
            auto_mask = torch.ones_like(pos_mask)
            auto_mask[:, batch_ind * pos_mask.shape[0]:(batch_ind + 1) * pos_mask.shape[0]].fill_diagonal_(0)
            pos_mask *= auto_mask
            cs_teacher = cs_st / temp
            shifted_cs_teacher = cs_teacher - cs_teacher.max(dim=1, keepdim=True)[0].detach()
            shifted_cs_teacher_with_only_neg = shifted_cs_teacher.exp() * (pos_mask + neg_mask)
            pos_neg_loss_matrix_teacher = -shifted_cs_teacher + torch.log(shifted_cs_teacher_with_only_neg.sum(dim=1, keepdim=True))
            loss_NCE_list.append(pos_neg_loss_matrix_teacher[torch.where(pos_mask!=0)].mean())
            if self.flat_norm_bank_proj_feat_ema.shape[0] != 0:
                cs_st_bank = anchor_proj_feat @ self.flat_norm_bank_proj_feat_ema.T
                bank_pos_mask = (bank_codebook_distance > pos_thresh)
                bank_neg_mask = (bank_codebook_distance < neg_thresh)
                cs_teacher_bank = cs_st_bank / temp
                shifted_cs_teacher_bank = cs_teacher_bank - cs_teacher_bank.max(dim=1, keepdim=True)[0].detach()
                shifted_cs_teacher_bank_with_only_neg = shifted_cs_teacher_bank.exp() * (bank_pos_mask + bank_neg_mask)
                pos_neg_loss_matrix_teacher_bank = -shifted_cs_teacher_bank + torch.log(shifted_cs_teacher_bank_with_only_neg.sum(dim=1, keepdim=True))
                loss_NCE_list.append(pos_neg_loss_matrix_teacher_bank[torch.where(bank_pos_mask!=0)].mean())
        loss_front = sum(loss_NCE_list) / float(len(loss_NCE_list))
        return loss_front


# ------------------------------- the checks ------------------------------------------------------------

def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert torch.allclose(ours, ref, rtol=RTOL, atol=1e-9), (float(ours), float(ref))


@pytest.mark.parametrize("grid", [False, True])
def test_modularity_loss_and_gradient_equal_the_reference(grid: bool):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, 6, generator=g, dtype=torch.float64)  # (B, P = 8 x 8, C)
    book = torch.randn(9, 6, generator=g, dtype=torch.float64)
    ref_book = book.clone().requires_grad_(True)
    ours_book = book.clone().requires_grad_(True)
    torch.manual_seed(5)  # the reference draws its grid order from the global RNG
    ref = compute_modularity_based_codebook(ref_book, x, grid=grid)
    if grid:
        torch.manual_seed(5)
        order = torch.randint(16, size=(3 * 2 * 2,))
        xs = grid_sample(x, (8, 8), 4, order)
    else:
        xs = x
    ours = modularity_loss(ours_book, xs, 0.1)
    _close(ours, ref)
    ref.backward()
    ours.backward()
    assert torch.allclose(ours_book.grad, ref_book.grad, rtol=RTOL, atol=1e-12)


def test_grid_sampling_equals_the_reference():
    x = torch.randn(2, 64, 3, dtype=torch.float64)
    order = torch.randint(16, size=(8,), generator=torch.Generator().manual_seed(1))
    ref, _ = stochastic_sampling(x, order=order)
    assert torch.equal(grid_sample(x, (8, 8), 4, order), ref)


def test_front_door_loss_with_bank_equals_the_reference_over_three_steps():
    """Three steps of loss + bank update, ours against the transcription, on the same tensors."""
    cfg = CauseConfig(projection_dim=5, bank_size=6)
    g = torch.Generator().manual_seed(3)
    book = torch.randn(7, 4, generator=g, dtype=torch.float64)
    ref_cluster = RefCluster(book, projection_dim=5, dim=4)
    ref_cluster.bank_init()
    ours_bank = ConceptBank(cfg.bank_size, cfg.bank_keep)
    g_ref, g_ours = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for _ in range(3):
        feat = torch.randn(3, 16, 4, generator=g, dtype=torch.float64)  # (B, P, C) sampled tokens
        proj = torch.randn(3, 16, 5, generator=g, dtype=torch.float64)
        proj_ema = torch.randn(3, 16, 5, generator=g, dtype=torch.float64)
        ref_cluster.bank_compute()
        proj_ref, proj_ours = proj.clone().requires_grad_(True), proj.clone().requires_grad_(True)
        ref = ref_cluster.contrastive_ema_with_codebook_bank(feat, proj_ref, proj_ema)
        ids, bank = ours_bank.flat(5, torch.device("cpu"))
        ours, _ = front_door_loss(concept_index(feat, book), proj_ours, proj_ema, book, ids, bank, cfg)
        _close(ours, ref)
        ref.backward()
        ours.backward()
        assert torch.allclose(proj_ours.grad, proj_ref.grad, rtol=RTOL, atol=1e-12)
        ref_cluster.bank_update(feat, proj_ema, max_num=cfg.bank_size, generator=g_ref)
        ours_bank.update(concept_index(feat, book), proj_ema, g_ours)
    ref_cluster.bank_compute()
    ids, bank = ours_bank.flat(5, torch.device("cpu"))
    assert torch.allclose(F.normalize(bank, dim=1), ref_cluster.flat_norm_bank_proj_feat_ema)
    assert torch.allclose(F.normalize(book[ids], dim=1), ref_cluster.flat_norm_bank_vq_feat)


def test_ema_update_equals_the_reference():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2).double(), torch.nn.Linear(3, 2).double()
    ref_teacher = torch.nn.Linear(3, 2).double()
    ref_teacher.load_state_dict(teacher.state_dict())
    ema_update(student, teacher, 0.99)
    ref_ema_update(student, ref_teacher)
    for a, b in zip(teacher.parameters(), ref_teacher.parameters()):
        assert torch.allclose(a, b, rtol=1e-12)


def test_tokens_layout_equals_the_reference():
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(tokens(x), untransform(x))
