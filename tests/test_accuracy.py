"""The regression matrix: one case per recipe × model (ptqsuite/matrix.toml), each quantized, evaluated and
asserted against its baseline under baselines/<device class>/."""


def test_accuracy(ptq_result, ptq_baseline):
    ptq_baseline.check(ptq_result)
