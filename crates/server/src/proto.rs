//! Generated code for the `reflex.v1` gRPC API, plus its encoded descriptor set for
//! reflection.

#![allow(missing_docs, clippy::all)]

tonic::include_proto!("reflex.v1");

/// Encoded `FileDescriptorSet` of the API, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("reflex_descriptor");
