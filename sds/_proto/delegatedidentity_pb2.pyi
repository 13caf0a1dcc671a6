from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Selector(_message.Message):
    __slots__ = ("type", "value")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    type: str
    value: str
    def __init__(self, type: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class SPIFFEID(_message.Message):
    __slots__ = ("trust_domain", "path")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    path: str
    def __init__(self, trust_domain: _Optional[str] = ..., path: _Optional[str] = ...) -> None: ...

class X509SVID(_message.Message):
    __slots__ = ("cert_chain", "id", "expires_at", "hint")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    id: SPIFFEID
    expires_at: int
    hint: str
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ..., id: _Optional[_Union[SPIFFEID, _Mapping]] = ..., expires_at: _Optional[int] = ..., hint: _Optional[str] = ...) -> None: ...

class JWTSVID(_message.Message):
    __slots__ = ("token", "id", "expires_at", "issued_at", "hint")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    token: str
    id: SPIFFEID
    expires_at: int
    issued_at: int
    hint: str
    def __init__(self, token: _Optional[str] = ..., id: _Optional[_Union[SPIFFEID, _Mapping]] = ..., expires_at: _Optional[int] = ..., issued_at: _Optional[int] = ..., hint: _Optional[str] = ...) -> None: ...

class X509SVIDWithKey(_message.Message):
    __slots__ = ("x509_svid", "x509_svid_key")
    X509_SVID_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_KEY_FIELD_NUMBER: _ClassVar[int]
    x509_svid: X509SVID
    x509_svid_key: bytes
    def __init__(self, x509_svid: _Optional[_Union[X509SVID, _Mapping]] = ..., x509_svid_key: _Optional[bytes] = ...) -> None: ...

class SubscribeToX509SVIDsRequest(_message.Message):
    __slots__ = ("selectors", "pid")
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    selectors: _containers.RepeatedCompositeFieldContainer[Selector]
    pid: int
    def __init__(self, selectors: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., pid: _Optional[int] = ...) -> None: ...

class SubscribeToX509SVIDsResponse(_message.Message):
    __slots__ = ("x509_svids", "federates_with")
    X509_SVIDS_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_FIELD_NUMBER: _ClassVar[int]
    x509_svids: _containers.RepeatedCompositeFieldContainer[X509SVIDWithKey]
    federates_with: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, x509_svids: _Optional[_Iterable[_Union[X509SVIDWithKey, _Mapping]]] = ..., federates_with: _Optional[_Iterable[str]] = ...) -> None: ...

class SubscribeToX509BundlesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubscribeToX509BundlesResponse(_message.Message):
    __slots__ = ("ca_certificates",)
    class CaCertificatesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    CA_CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    ca_certificates: _containers.ScalarMap[str, bytes]
    def __init__(self, ca_certificates: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class FetchJWTSVIDsRequest(_message.Message):
    __slots__ = ("audience", "selectors", "pid")
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    audience: _containers.RepeatedScalarFieldContainer[str]
    selectors: _containers.RepeatedCompositeFieldContainer[Selector]
    pid: int
    def __init__(self, audience: _Optional[_Iterable[str]] = ..., selectors: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., pid: _Optional[int] = ...) -> None: ...

class FetchJWTSVIDsResponse(_message.Message):
    __slots__ = ("svids",)
    SVIDS_FIELD_NUMBER: _ClassVar[int]
    svids: _containers.RepeatedCompositeFieldContainer[JWTSVID]
    def __init__(self, svids: _Optional[_Iterable[_Union[JWTSVID, _Mapping]]] = ...) -> None: ...

class SubscribeToJWTBundlesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SubscribeToJWTBundlesResponse(_message.Message):
    __slots__ = ("bundles",)
    class BundlesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.ScalarMap[str, bytes]
    def __init__(self, bundles: _Optional[_Mapping[str, bytes]] = ...) -> None: ...
