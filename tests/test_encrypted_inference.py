"""Encrypted inference: CKKS predictions match the plaintext head; the server cannot decrypt;
queries and replies under other keys, bad inputs and tampered bytes are refused."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import tenseal.sealapi as seal
import torch
from safetensors.torch import save_file

from mmshield.api import load_data, model_for
from mmshield.cli import main
from mmshield.config import config_from_dict, config_to_yaml
from mmshield.crypto import encrypted_inference as ei
from mmshield.crypto.encrypted_inference import (
    MODULUS_BUDGET,
    HeadSpec,
    InferenceClient,
    InferenceServer,
    LinearHead,
    PolyMLPHead,
    choose_parameters,
    train_poly_head,
)
from mmshield.errors import EncryptionError
from mmshield.models.model import MultimodalModel
from mmshield.privacy.embed import embed_records

CONFIG = {
    "name": "he-inference-test",
    "seed": 0,
    "dataset": {"name": "av-digits"},
    "model": {"embed_dim": 16, "fusion": "concat", "fusion_hidden": 32},
}


@dataclass
class Trained:
    model: MultimodalModel
    run_dir: Path
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """A small av-digits model (2 epochs of Adam, ~90% test accuracy) and a run directory."""
    config = config_from_dict(CONFIG)
    train, test, _, _ = load_data(config)
    model = model_for(config, train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        gen = torch.Generator().manual_seed(0)
        model.train()
        for _ in range(2):
            order = torch.randperm(len(train), generator=gen).numpy()
            for i in range(0, len(train), 64):
                batch = train.subset(order[i : i + 64])
                loss = torch.nn.functional.cross_entropy(
                    model(batch.inputs, batch.present), batch.labels
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
        train_x, test_x = embed_records(model, train), embed_records(model, test)
    finally:
        torch.set_num_threads(threads)
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "config.yaml").write_text(config_to_yaml(config))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, run_dir / "model.safetensors"
    )
    return Trained(model, run_dir, train_x, train.labels.numpy(), test_x, test.labels.numpy())


@pytest.fixture(scope="module")
def linear(trained: Trained) -> LinearHead:
    return LinearHead.from_module(trained.model.head, trained.train_x)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def poly(trained: Trained) -> PolyMLPHead:
    return train_poly_head(trained.train_x, trained.train_y, hidden=16, epochs=30)


@pytest.fixture(scope="module")
def linear_pair(linear: LinearHead) -> tuple[InferenceClient, InferenceServer]:
    client = InferenceClient(linear.spec().to_bytes())
    return client, InferenceServer(client.public_context(), linear)


@pytest.fixture(scope="module")
def poly_pair(poly: PolyMLPHead) -> tuple[InferenceClient, InferenceServer]:
    client = InferenceClient(poly.spec().to_bytes())
    return client, InferenceServer(client.public_context(), poly)


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a.argmax(1) == b.argmax(1)).mean())


def test_linear_head_under_encryption_predicts_like_the_plaintext_head(
    trained: Trained, linear: LinearHead, linear_pair: tuple[InferenceClient, InferenceServer]
) -> None:
    with torch.no_grad():
        own = trained.model.head(torch.from_numpy(trained.test_x)).double().numpy()
    plain = linear.logits(trained.test_x)
    np.testing.assert_allclose(plain, own, atol=1e-4)  # the model's own head, in float64
    assert (plain.argmax(1) == trained.test_y).mean() > 0.8  # a real model, not chance
    client, server = linear_pair
    assert linear.spec().params.poly_modulus_degree == 4096  # depth 1: the smallest secure ring
    enc = client.decrypt(server.evaluate(client.encrypt(trained.test_x)))
    assert enc.shape == (1000, 10)
    assert _agreement(enc, plain) >= 0.995
    assert np.abs(enc - plain).max() < 1e-2


def test_polynomial_head_is_close_to_the_models_head_and_matches_under_encryption(
    trained: Trained, poly: PolyMLPHead, poly_pair: tuple[InferenceClient, InferenceServer]
) -> None:
    plain = poly.logits(trained.test_x)
    with torch.no_grad():
        own = trained.model.head(torch.from_numpy(trained.test_x)).numpy()
    own_acc = (own.argmax(1) == trained.test_y).mean()
    assert (plain.argmax(1) == trained.test_y).mean() >= own_acc - 0.03
    # The server evaluates the folded form W2' (W1' x + b1')² + b2': the same function.
    (w1, b1), (w2, b2) = poly.layers()
    folded = (trained.test_x @ w1.T + b1) ** 2 @ w2.T + b2
    np.testing.assert_allclose(folded, plain, atol=1e-8 * max(1.0, np.abs(plain).max()))
    client, server = poly_pair
    assert poly.spec().params.poly_modulus_degree == 8192  # depth 3
    enc = client.decrypt(server.evaluate(client.encrypt(trained.test_x, layout="packed")))
    assert _agreement(enc, plain) >= 0.995
    assert np.abs(enc - plain).max() < 1e-2
    # The low-latency layout (one or two queries per ciphertext) gives the same logits.
    few = trained.test_x[:6]
    expanded = client.decrypt(server.evaluate(client.encrypt(few, layout="expanded")))
    np.testing.assert_allclose(expanded, plain[:6], atol=1e-2)
    one = client.decrypt(server.evaluate(client.encrypt(few[0])))  # auto: expanded
    np.testing.assert_allclose(one[0], plain[0], atol=1e-2)


@pytest.mark.parametrize(
    ("kind", "d", "h", "c"), [("linear", 48, 0, 3), ("linear", 8, 0, 10), ("poly", 100, 20, 10)]
)
def test_shapes_that_are_not_powers_of_two_are_padded_exactly(
    kind: str, d: int, h: int, c: int
) -> None:
    rng = np.random.default_rng(d)
    x = rng.normal(size=(40, d))
    head: LinearHead | PolyMLPHead
    if kind == "linear":  # 8 inputs and 10 classes: more rows than columns
        head = LinearHead(rng.normal(size=(c, d)) / np.sqrt(d), rng.normal(size=c), 8.0)
    else:
        w1, w2 = rng.normal(size=(h, d)) / np.sqrt(d), rng.normal(size=(c, h)) / np.sqrt(h)
        head = PolyMLPHead(w1, rng.normal(size=h), (0.3, 0.5, -0.2), w2, rng.normal(size=c),
                           x.mean(0), float(x.std()), 8.0)  # fmt: skip
    client = InferenceClient(head.spec())
    server = InferenceServer(client.public_context(), head)
    plain = head.logits(x)
    for layout in ("packed", "expanded") if kind == "poly" else ("packed",):
        got = client.decrypt(server.evaluate(client.encrypt(x, layout=layout)))  # type: ignore[arg-type]
        np.testing.assert_allclose(got, plain, atol=1e-2)


def test_server_holds_only_public_evaluation_keys(
    linear: LinearHead, poly_pair: tuple[InferenceClient, InferenceServer]
) -> None:
    client, server = poly_pair
    assert not server.has_secret_key
    assert not any(
        isinstance(v, seal.SecretKey | seal.Decryptor | seal.Encryptor)
        for v in vars(server).values()
    )
    # The context carries the spec, Galois keys for the needed rotations only, and relin keys.
    spec_bytes, galois, relin = ei._unpack(client.public_context(), ei._CONTEXT, 3)
    assert HeadSpec.from_bytes(spec_bytes) == client.spec
    assert galois and relin
    plan = ei._Plan.of(client.spec)
    assert len(plan.rotation_steps()) <= 10  # not the 2·log2(N/2) a generic context carries
    assert len(client.public_context()) < 16e6
    # The linear head needs no relinearisation keys and few rotations: a small context.
    linear_client = InferenceClient(linear.spec())
    assert len(linear_client.public_context()) < 1.5e6


def test_queries_and_replies_under_other_keys_are_refused(
    trained: Trained, linear: LinearHead, linear_pair: tuple[InferenceClient, InferenceServer]
) -> None:
    alice, server = linear_pair
    mallory = InferenceClient(linear.spec())
    x = trained.test_x[:3]
    fp_a, fp_m = alice.fingerprint.hex()[:16], mallory.fingerprint.hex()[:16]
    with pytest.raises(EncryptionError, match="another client's keys") as err:
        server.evaluate(mallory.encrypt(x))
    assert fp_a in str(err.value) and fp_m in str(err.value)
    with pytest.raises(EncryptionError, match=fp_m):
        mallory.decrypt(server.evaluate(alice.encrypt(x)))
    # A forged fingerprint gets past the server, but the result is noise and the client says so.
    parts = ei._unpack(mallory.encrypt(x), ei._QUERY, 2)
    forged = ei._pack(ei._QUERY, [alice.fingerprint, *parts[1:]])
    with pytest.raises(EncryptionError, match="decrypts to noise"):
        alice.decrypt(server.evaluate(forged))
    # A reply relabelled for another client decrypts to noise too.
    parts = ei._unpack(server.evaluate(alice.encrypt(x)), ei._REPLY, 2)
    with pytest.raises(EncryptionError, match="decrypts to noise"):
        mallory.decrypt(ei._pack(ei._REPLY, [mallory.fingerprint, *parts[1:]]))


def test_bad_inputs_and_bytes_are_refused_with_clear_errors(
    trained: Trained,
    linear: LinearHead,
    poly: PolyMLPHead,
    linear_pair: tuple[InferenceClient, InferenceServer],
) -> None:
    client, server = linear_pair
    d = linear.in_dim
    with pytest.raises(EncryptionError, match=rf"shape \(3, {d + 1}\).*\(Q, {d}\)"):
        client.encrypt(np.zeros((3, d + 1)))
    with pytest.raises(EncryptionError, match="non-finite"):
        client.encrypt(np.full(d, np.nan))
    with pytest.raises(EncryptionError, match="input bound"):
        client.encrypt(np.full(d, 10 * linear.input_bound))
    with pytest.raises(EncryptionError, match="expanded layout"):
        client.encrypt(trained.test_x[:1], layout="expanded")
    query = client.encrypt(trained.test_x[:2])
    with pytest.raises(EncryptionError, match=r"truncated|malformed"):
        server.evaluate(query[:-100])
    with pytest.raises(EncryptionError, match="expected an encrypted-inference query"):
        server.evaluate(client.public_context())
    with pytest.raises(EncryptionError, match="not an encrypted-inference"):
        server.evaluate(b"hello world")
    flipped = bytearray(query)
    flipped[len(flipped) // 2] ^= 0xFF
    with pytest.raises(EncryptionError):
        client.decrypt(server.evaluate(bytes(flipped)))
    # A context built for one head is refused by a server holding another.
    with pytest.raises(EncryptionError, match="built for"):
        InferenceServer(client.public_context(), poly)
    wider = replace(linear, input_bound=linear.input_bound * 8)
    with pytest.raises(EncryptionError, match="built for"):
        InferenceServer(client.public_context(), wider)
    with pytest.raises(EncryptionError, match="not an encrypted-inference evaluation context"):
        InferenceServer(b"MHE0" + client.public_context()[4:], linear)


def test_parameters_are_the_smallest_128_bit_secure_ring() -> None:
    lin = choose_parameters(1, 50.0, lanes=64)
    assert lin.poly_modulus_degree == 4096 and lin.modulus_bits <= MODULUS_BUDGET[4096]
    assert lin.coeff_mod_bit_sizes[0] - lin.scale_bits >= 7  # room for |values| up to 50
    mlp = choose_parameters(3, 1e5, lanes=64)
    assert mlp.poly_modulus_degree == 8192 and mlp.modulus_bits <= MODULUS_BUDGET[8192]
    assert mlp.depth == 3
    for params in (lin, mlp):  # SEAL itself accepts them at 128-bit security
        ei._seal_context(params)
    with pytest.raises(EncryptionError, match="no 128-bit-secure"):
        choose_parameters(40, 1e6)
    unsafe = ei.CKKSParameters(4096, (60, 40, 60), 40)
    with pytest.raises(EncryptionError, match="not 128-bit secure"):
        ei._seal_context(unsafe)


@pytest.mark.slow
def test_cli_infer_encrypted_on_a_checkpoint(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir = str(trained.run_dir)
    assert main(["infer", run_dir, "--encrypted", "--limit", "100", "--batch", "64"]) == 0
    out = capsys.readouterr().out
    agreement = re.search(r"agreement with the plaintext head\s*│\s*([0-9.]+)", out)
    assert agreement is not None and float(agreement.group(1)) >= 0.995, out
    assert "N=4096" in out and "bytes up / down per query" in out
    poly = ["--head", "poly", "--hidden", "16", "--limit", "10", "--batch", "5"]
    assert main(["infer", run_dir, "--encrypted", *poly]) == 0
    out = capsys.readouterr().out
    assert "the model's own head: accuracy" in out and "N=8192" in out
    assert main(["infer", run_dir, "--limit", "20"]) == 0
    out = capsys.readouterr().out
    assert "plaintext head accuracy" in out and "--encrypted" in out
    assert main(["infer", str(trained.run_dir.parent / "missing")]) == 2
