// Copyright 2022 Amazon.com, Inc. or its affiliates. All Rights Reserved.
//
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

//! A crate that provides vsock device specific components as described
//! by the virtio specification.

#![deny(missing_docs)]

/// Contains a vsock packet abstraction.
pub mod packet;
