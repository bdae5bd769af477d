"""Link rates for ``swarmnet bench link``, read as tc writes them."""

import pytest

from swarmnet.testing.netns import rate_bits


def test_link_rates_read_as_tc_writes_them():
    assert rate_bits("100mbit") == 100e6 and rate_bits("2.5Gbit") == 2.5e9 and rate_bits("64kbit") == 64e3
    assert rate_bits("9600bit") == 9600
    for bad in ("fast", "1gbps", "gbit", "1 gbit"):
        with pytest.raises(ValueError, match="not a link rate"):
            rate_bits(bad)
