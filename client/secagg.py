"""A site's side of secure aggregation (`--secagg`): Flower's `secaggplus_mod` masks the update
that medfed's own train handler (client/app.py, unchanged) produces.

Flower 1.42's SecAgg+ speaks the legacy API: the mod hands the handler a legacy fit instruction
(`fitins.*` records: the global arrays as unnamed parameters, the config) and expects a legacy fit
result back (`fitres.*`: parameters, example count, status). `legacy_fit`, a mod between the two,
translates: the instruction becomes medfed's train message again (the arrays named by the round
config's `array-keys`), and medfed's reply becomes a fit result whose parameters are the site's
update (trained - received) and whose example count is its weight. `secaggplus_mod` then weights,
quantizes and masks that update and empties every array record of the reply; the site's other
records (its train metrics, its evaluation of the model it received, its privacy spend) go back
beside the masked update as they are, in the clear.

`secure_aggregation` is the one mod on medfed's train handler, in deployment and simulation alike:
it engages the two only for a round the server runs under SecAgg+ (its messages carry SecAgg+'s
config record), so the same site app serves studies with and without `privacy.secagg`.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.compat.common import recorddict_compat as compat

from medfed.common.messages import ARRAY_KEYS, ARRAYS, CONFIG, METRICS, SECAGG_RANGE, WEIGHT_KEY

# Flower's legacy fit instruction records (flwr.compat.common.recorddict_compat).
FITINS_ARRAYS, FITINS_CONFIG = "fitins.parameters", "fitins.config"


def legacy_fit(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: a legacy fit instruction in, medfed's train handler called, a legacy fit
    result with the site's update out (see the module's docstring)."""
    if message.metadata.message_type != MessageType.TRAIN:
        return call_next(message, context)
    config = message.content.config_records[FITINS_CONFIG]
    keys = [str(key) for key in config[ARRAY_KEYS]]
    received = [a.numpy() for a in message.content.array_records[FITINS_ARRAYS].values()]
    message.content = RecordDict({
        ARRAYS: ArrayRecord({k: Array(v) for k, v in zip(keys, received, strict=True)}),
        CONFIG: ConfigRecord({k: v for k, v in config.items() if k != ARRAY_KEYS}),
    })
    reply = call_next(message, context)
    if reply.has_error():
        return reply
    trained = reply.content[ARRAYS]
    update = [trained[k].numpy().astype(np.float64) - r for k, r in zip(keys, received)]
    for key, values in zip(keys, update):
        largest = float(np.abs(values).max(initial=0.0))
        if not largest <= SECAGG_RANGE:
            raise ValueError(
                f"the update of '{key}' reaches {largest:.3g}, beyond SecAgg+'s range of "
                f"+/-{SECAGG_RANGE:g} per value, where it would be clipped; this site sits the "
                f"round out (a smaller learning rate keeps updates in range)")
    result = FitRes(status=Status(code=Code.OK, message=""),
                    parameters=ndarrays_to_parameters(update),
                    num_examples=int(reply.content[METRICS][WEIGHT_KEY]), metrics={})
    content = compat.fitres_to_recorddict(result, keep_input=False)
    for name, record in reply.content.items():
        if name != ARRAYS:
            content[name] = record
    reply.content = content
    return reply


def secure_aggregation(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod on train: a SecAgg+ round goes through Flower's `secaggplus_mod` around
    `legacy_fit` around `call_next`; any other training message straight to `call_next`."""
    if RECORD_KEY_CONFIGS not in message.content.config_records:
        return call_next(message, context)
    return secaggplus_mod(message, context,
                          lambda inner, ctx: legacy_fit(inner, ctx, call_next))
