"""Names of the records fedcomp puts in Flower Messages.

Model state never travels as a Flower ArrayRecord: each direction carries one compressed
payload (raw bytes in a ConfigRecord), so the bytes counted are the bytes a real link moves.
"""

DOWN = "fedcomp.down"  # ConfigRecord {"payload": bytes}: server -> client
UP = "fedcomp.up"  # ConfigRecord {"payload": bytes}: client -> server
PAYLOAD = "payload"
CONFIG = "config"  # ConfigRecord: round number and local-training settings
METRICS = "metrics"  # MetricRecord: num-examples, train-loss, compute-s, partition-id
