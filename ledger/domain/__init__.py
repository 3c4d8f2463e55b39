"""The books, in pure Python: value types and the rules that apply transfers.

No I/O, no gRPC, no SQL. Storage runs these rules inside its transactions on
rows it has locked; the API layer maps protobuf to these types and back.
"""
