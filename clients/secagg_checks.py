"""What a campus's replies to the four SecAgg+ stages may hold, checked against its own SecAgg+ state.

Flower's ``secaggplus_mod`` (:mod:`clients.secagg`) sends every stage as a
``train`` message carrying a ``secaggplus_configs`` record; each stage's reply
may hold only the stage's declared values and the campus name, and the
masked-vector stage no plain model array (:func:`secagg_violations`).
"""

from __future__ import annotations

import numpy as np
from cryptography.fernet import InvalidToken
from flwr.app import Context, Message
from flwr.app.message_type import MessageType
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import bytes_to_private_key, public_key_to_bytes

from edufl.federation.metrics import TRAIN_METRICS
from edufl.federation.proto.audit_pb2 import ArraySpec
from edufl.federation.runconfig import RunConfig
from edufl.federation.secaggplus import doubly_named
from edufl.federation.wire import CAMPUS, CONFIG, NUM_EXAMPLES

from .reply_checks import expected_arrays, metric_problems

__all__ = [
    "FIT_METRICS",
    "FIT_NUM_EXAMPLES",
    "FIT_OK",
    "FIT_PARAMETERS",
    "FIT_STATUS",
    "SECAGG",
    "masked_specs",
    "secagg_stage",
    "secagg_violations",
]

# SecAgg+ (Flower's secaggplus_mod): the record holding each stage's request and reply values, and the
# records of a masked-vector reply, which is Flower's legacy FitRes with its parameters emptied.
SECAGG = RECORD_KEY_CONFIGS
FIT_PARAMETERS, FIT_NUM_EXAMPLES, FIT_METRICS, FIT_STATUS = (
    "fitres.parameters",
    "fitres.num_examples",
    "fitres.metrics",
    "fitres.status",
)
FIT_OK = {"code": 0, "message": "Success"}


def secagg_stage(msg: Message) -> str | None:
    """The SecAgg+ stage a request asks for (Flower sends every stage as a ``train`` message
    carrying a ``secaggplus_configs`` record), or None for any other request."""
    if msg.metadata.message_type != MessageType.TRAIN or SECAGG not in msg.content.config_records:
        return None
    return str(msg.content.config_records[SECAGG].get(Key.STAGE, ""))


def secagg_violations(stage: str, asked: dict, msg: Message, reply: Message, context: Context, min_cohort: int) -> list[str]:
    """Everything in the reply to SecAgg+ stage ``stage`` that the protocol does not declare; empty if it may leave.

    ``asked`` holds the request's stage values as they arrived (``secaggplus_mod``
    consumes the stage key). Each reply is checked against the campus's own
    SecAgg+ state (the mod keeps it in the run's context):

    * ``setup``: exactly the two public keys, and they are the public halves of
      the key pairs the campus just made (its private keys stay);
    * ``share_keys``: one ciphertext to each neighbour the coordinator announced;
      each decrypts, under the campus's pairwise key with that neighbour, to this
      campus's share of its mask seed and of its masking key, addressed to that
      neighbour, and the campus's own shares with a threshold's worth of them
      rebuild its seed and key (the coordinator cannot decrypt them);
    * ``collect_masked_vectors``: the masked vector (the weight and one array of
      each of the run model's parameter shapes, integers modulo the protocol's
      modulus), the declared training metrics on at least ``min_cohort`` records,
      the example count (the weight Flower's FitRes carries in the clear), an OK
      status, and no plain model array;
    * ``unmask``: for each node the coordinator asked about, the one share it
      asked for (of the mask seed of a node it calls active, of the masking key of
      one it calls dropped), never both for one node, and no share for this
      campus's own key.
    """
    if stage not in Stage.all():
        return [f"SecAgg+ stage {stage!r} is not released by this campus"]
    content = reply.content
    expected = {SECAGG, CAMPUS} | (
        {FIT_PARAMETERS, FIT_NUM_EXAMPLES, FIT_METRICS, FIT_STATUS} if stage == Stage.COLLECT_MASKED_VECTORS else set()
    )
    found = []
    if set(content) != expected:
        found.append(f"records {sorted(content)}; expected {sorted(expected)}")
    if CAMPUS in content.config_records and set(content.config_records[CAMPUS]) != {"name"}:
        found.append(f"campus record keys {sorted(content.config_records[CAMPUS])}; expected ['name']")
    if SECAGG not in content.config_records:  # reported with the records
        return found
    if RECORD_KEY_STATE not in context.state.config_records:
        return [*found, f"no SecAgg+ state on this campus for the {stage} reply"]
    check = {
        Stage.SETUP: _setup_problems,
        Stage.SHARE_KEYS: _share_keys_problems,
        Stage.COLLECT_MASKED_VECTORS: _masked_vector_problems,
        Stage.UNMASK: _unmask_problems,
    }[stage]
    try:
        state = SecAggPlusState(**context.state.config_records[RECORD_KEY_STATE])
        found += check(asked, content, state, msg, min_cohort)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:  # malformed: fail closed
        found.append(f"the {stage} reply is not the declared SecAgg+ message ({type(err).__name__}: {err})")
    return found


def _setup_problems(asked, content, state: SecAggPlusState, msg, min_cohort) -> list[str]:
    values = content.config_records[SECAGG]
    if set(values) != {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2}:
        return [f"setup reply keys {sorted(values)}; expected the two public keys {Key.PUBLIC_KEY_1}, {Key.PUBLIC_KEY_2}"]
    own = [public_key_to_bytes(bytes_to_private_key(sk).public_key()) for sk in (state.sk1, state.sk2)]
    if [values[Key.PUBLIC_KEY_1], values[Key.PUBLIC_KEY_2]] != own:
        return ["the setup reply's keys are not the public halves of this campus's own SecAgg+ key pairs"]
    return []


def _share_keys_problems(asked, content, state: SecAggPlusState, msg, min_cohort) -> list[str]:
    values = content.config_records[SECAGG]
    if set(values) != {Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST}:
        return [f"share_keys reply keys {sorted(values)}; expected {Key.DESTINATION_LIST}, {Key.CIPHERTEXT_LIST}"]
    dsts, ciphertexts = list(values[Key.DESTINATION_LIST]), list(values[Key.CIPHERTEXT_LIST])
    announced = sorted({int(k) for k in asked if k != Key.STAGE} - {state.nid})
    if sorted(dsts) != announced or len(ciphertexts) != len(dsts):
        return [
            f"{len(ciphertexts)} ciphertexts to nodes {sorted(dsts)}; expected one to each neighbour the "
            f"coordinator announced ({announced})"
        ]
    seeds, keys = [state.rd_seed_share_dict[state.nid]], [state.sk1_share_dict[state.nid]]
    for dst, ciphertext in zip(dsts, ciphertexts, strict=True):
        try:
            src, to, seed_share, key_share = share_keys_plaintext_separate(decrypt(state.ss2_dict[dst], ciphertext))
        except InvalidToken:
            return [f"the ciphertext to node {dst} is not encrypted under this campus's pairwise key with it"]
        if (src, to) != (state.nid, dst) or (len(seed_share), len(key_share)) != (len(seeds[0]), len(keys[0])):
            return [f"the ciphertext to node {dst} holds more than this campus's two key shares for that node"]
        seeds.append(seed_share)
        keys.append(key_share)
    t = state.threshold
    if combine_shares(seeds[:t]) != state.rd_seed or combine_shares(keys[:t]) != state.sk1:
        return ["the encrypted shares do not rebuild this campus's own mask seed and masking key"]
    return []


def _masked_vector_problems(asked, content, state: SecAggPlusState, msg, min_cohort) -> list[str]:
    values = content.config_records[SECAGG]
    if set(values) != {Key.MASKED_PARAMETERS}:
        return [f"masked-vector reply keys {sorted(values)}; expected {Key.MASKED_PARAMETERS}"]
    found = []
    cfg = RunConfig.from_flower(dict(msg.content[CONFIG]))
    model = cfg.model
    expected = [[1]] + [shape for _, shape, _ in expected_arrays(cfg)]  # the weight, then the parameters
    masked = [bytes_to_ndarray(b) for b in values[Key.MASKED_PARAMETERS]]
    shapes = [list(a.shape) for a in masked]
    if shapes != expected:
        found.append(f"masked arrays of shapes {shapes}; expected the weight and the {model} model's parameters {expected}")
    elif any(a.dtype != np.int64 or a.min() < 0 or a.max() >= state.mod_range for a in masked):
        found.append(f"the masked vector holds values other than integers in [0, {state.mod_range})")
    if len(content.array_records[FIT_PARAMETERS]):
        found.append(f"plain model arrays {sorted(content.array_records[FIT_PARAMETERS])} next to the masked vector")
    metrics = content.config_records[FIT_METRICS]
    found += metric_problems(metrics, TRAIN_METRICS, min_cohort)
    if dict(content.metric_records[FIT_NUM_EXAMPLES]) != {"num_examples": metrics.get(NUM_EXAMPLES)}:
        found.append(f"the example count {dict(content.metric_records[FIT_NUM_EXAMPLES])} is not the metrics' {NUM_EXAMPLES}")
    if dict(content.config_records[FIT_STATUS]) != FIT_OK:
        found.append(f"status {dict(content.config_records[FIT_STATUS])}; expected {FIT_OK}")
    return found


def _unmask_problems(asked, content, state: SecAggPlusState, msg, min_cohort) -> list[str]:
    values = content.config_records[SECAGG]
    if set(values) != {Key.NODE_ID_LIST, Key.SHARE_LIST}:
        return [f"unmask reply keys {sorted(values)}; expected {Key.NODE_ID_LIST}, {Key.SHARE_LIST}"]
    active, dropped = list(asked[Key.ACTIVE_NODE_ID_LIST]), list(asked[Key.DEAD_NODE_ID_LIST])
    both = doubly_named(active, dropped, state.nid)
    if both:
        return [f"shares of both the mask seed and the masking key of nodes {both}"]
    owed = [state.rd_seed_share_dict[n] for n in active] + [state.sk1_share_dict[n] for n in dropped]
    if list(values[Key.NODE_ID_LIST]) != active + dropped or list(values[Key.SHARE_LIST]) != owed:
        return ["the unmask reply holds other shares than the one share asked for each node"]
    return []


def masked_specs(reply: Message) -> list[ArraySpec]:
    """Shape and dtype of each array of a SecAgg+ masked vector in ``reply`` (none elsewhere)."""
    values = reply.content.config_records.get(SECAGG, {}).get(Key.MASKED_PARAMETERS, [])
    specs = []
    for i, data in enumerate(values if isinstance(values, list) else []):
        try:
            array = bytes_to_ndarray(data)
        except (TypeError, ValueError, EOFError):
            continue  # not an array: the guard blocks the reply
        specs.append(ArraySpec(name=f"{Key.MASKED_PARAMETERS}[{i}]", shape=list(array.shape), dtype=str(array.dtype)))
    return specs
