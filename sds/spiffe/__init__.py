"""SPIFFE domain types: IDs and trust domains, X.509-SVIDs and bundles, JWT-SVIDs and JWKS.

Pure values and the checks that gate them (SPIFFE-ID, X509-SVID and JWT-SVID
standards); nothing here knows about gRPC, protobuf or Envoy. Every other
package builds on this one.
"""
