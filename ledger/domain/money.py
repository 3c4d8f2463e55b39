"""Currencies and amounts: integers in minor units, never floats."""

from __future__ import annotations

# ISO 4217 active alphabetic codes and their minor-unit exponent (scale).
# Scale is informational for callers; the ledger itself only adds integers.
_SCALE_ZERO = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_SCALE_THREE = "BHD IQD JOD KWD LYD OMR TND"
_SCALE_FOUR = "CLF UYW"
_SCALE_TWO = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD "
    "BTN BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP "
    "ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR "
    "JMD KES KGS KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU "
    "MUR MVR MWK MXN MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR "
    "RON RSD RUB SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS "
    "TMT TOP TRY TTD TWD TZS UAH USD USN UYU UZS VED VES WST XCD XCG YER ZAR ZMW ZWG"
)

CURRENCY_SCALE: dict[str, int] = {
    **{code: 0 for code in _SCALE_ZERO.split()},
    **{code: 2 for code in _SCALE_TWO.split()},
    **{code: 3 for code in _SCALE_THREE.split()},
    **{code: 4 for code in _SCALE_FOUR.split()},
}


def is_known_currency(code: str) -> bool:
    return code in CURRENCY_SCALE
