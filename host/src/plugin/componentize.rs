//! Core modules become components at load.
//!
//! A Rust plugin built for `wasm32-unknown-unknown` with `wit-bindgen` is a core module that carries
//! its world in a `component-type` custom section. Encoding it as a component here, rather than
//! with a separate tool, lets its author load the file cargo writes; and such a component is one
//! core instance with no WASI imports, where a `wasm32-wasip2` build is three core instances and
//! fifteen WASI interfaces that every fresh instance links (about 4 µs of the ~15 µs a router call
//! costs, measured with `plugin-bench`). Components pass through unchanged.

use super::PluginError;

/// The first eight bytes of a core module: the magic number and version 1 (a component's version
/// field differs, and its layer field is 1).
const CORE_MODULE_HEADER: [u8; 8] = *b"\0asm\x01\0\0\0";

/// Whether `wasm` is a core module rather than a component.
pub fn is_core_module(wasm: &[u8]) -> bool {
    wasm.starts_with(&CORE_MODULE_HEADER)
}

/// The component for `wasm`: a core module is encoded with the world its `component-type` section
/// names (a module without one is refused, naming the cause); anything else is returned as it is,
/// for the compiler to accept or refuse.
pub fn component(wasm: Vec<u8>) -> Result<Vec<u8>, PluginError> {
    if !is_core_module(&wasm) {
        return Ok(wasm);
    }
    let refused = |why: String| PluginError::Compile(format!("a core module, not a component, and {why}"));
    match wit_component::metadata::decode(&wasm) {
        Ok((Some(_), _)) => {}
        Ok((None, _)) => {
            return Err(refused("it names no world (no component-type section: build it with wit-bindgen)".into()))
        }
        Err(e) => return Err(refused(format!("not a valid one: {e:#}"))),
    }
    let mut encoder = wit_component::ComponentEncoder::default();
    encoder
        .module(&wasm)
        .and_then(|encoder| encoder.validate(true).encode())
        .map_err(|e| refused(format!("it cannot be encoded as one: {e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_passes_through() {
        // The smallest component: the preamble alone (magic, version 0x0d, layer 1).
        let empty = b"\0asm\x0d\0\x01\0".to_vec();
        assert!(!is_core_module(&empty));
        assert_eq!(component(empty.clone()).unwrap(), empty);
    }

    #[test]
    fn a_core_module_without_a_world_is_refused_with_the_cause() {
        let empty_module = CORE_MODULE_HEADER.to_vec();
        match component(empty_module) {
            Err(PluginError::Compile(message)) => assert!(message.contains("names no world"), "{message}"),
            other => panic!("a typed refusal, not {other:?}"),
        }
    }
}
