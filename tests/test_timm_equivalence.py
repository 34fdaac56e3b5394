"""Acceptance 1: se_inject on timm ResNets gives exactly timm's hand-written SE-ResNets."""

import pytest
import timm
import torch

import se_inject
from tests.helpers import SE_PAIRS, count_params

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("base, native, params", SE_PAIRS, ids=[p[0] for p in SE_PAIRS])
def test_injected_resnet_is_timms_se_resnet(base, native, params):
    ours = se_inject.apply(timm.create_model(base, pretrained=False), reduction=16)
    theirs = timm.create_model(native, pretrained=False).eval()
    assert count_params(ours) == count_params(theirs) == params
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x), rtol=0, atol=1e-5)


def test_se_goes_before_drop_path_as_in_timm():
    ours = se_inject.apply(timm.create_model("resnet50", drop_path_rate=0.1))
    code = ours.layer4[2].code
    assert code.index("self.se(") < code.index("self.drop_path(") < code.index(" + ")
    ours.load_state_dict(timm.create_model("seresnet50", drop_path_rate=0.1).state_dict(), strict=True)
