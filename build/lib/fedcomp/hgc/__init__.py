"""Hybrid Gradient Compression (Hu, Jiang, He, IJCAI-24; shared/papers/003_...): the algorithm.

  quantizer.py  level quantizer of Eq. 3
  predictor.py  Eq. 4 predictor and the XOR residue of quantized symbols
  schedule.py   sparsification-ratio warm-up and the adjustment around learning-rate steps (Sec. 3.2)
  codec.py      the client payload, the relayed downlink, the aggregation both sides share

The Flower side (mask protocol, rounds) is fedcomp/fl/hgc_strategy.py and fedcomp/fl/hgc_client.py.
"""
