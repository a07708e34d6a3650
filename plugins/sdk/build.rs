//! Writes the world-export macros with the contract's WIT text inlined.
//!
//! A plugin's world (its exports) has to be generated in the plugin crate, not here: `wit-bindgen` records a
//! world's description in the object code of the crate that runs `generate!`, and the linker would then
//! carry both worlds' descriptions into every plugin (a router would import the filter's `filtering`
//! interface). `generate!` reads WIT relative to the crate being compiled, so the export macros carry the
//! WIT text itself, inlined here from `wit/meridian-plugin.wit`.

use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let wit_path = manifest.join("../../wit/meridian-plugin.wit");
    println!("cargo::rerun-if-changed={}", wit_path.display());
    let wit = std::fs::read_to_string(&wit_path).expect("reading wit/meridian-plugin.wit");
    assert!(!wit.contains("\"###"), "the WIT text must not end the raw string it is inlined in");

    let mut out = String::new();
    for (macro_name, module, world, shared, impl_body) in [
        (
            "__meridian_router_world",
            "__meridian_router_world",
            "router",
            ["host", "types", "routing"],
            "fn configure(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                ::meridian_plugin_sdk::__report_panics();
                <$ty as ::meridian_plugin_sdk::Router>::configure(&config)
            }
            fn route(
                request: ::meridian_plugin_sdk::RequestSummary,
                targets: ::std::vec::Vec<::meridian_plugin_sdk::Target>,
            ) -> ::meridian_plugin_sdk::Outcome {
                <$ty as ::meridian_plugin_sdk::Router>::route(request, targets)
            }",
        ),
        (
            "__meridian_filter_world",
            "__meridian_filter_world",
            "privacy-filter",
            ["host", "types", "filtering"],
            "fn configure(config: ::std::string::String) -> ::core::result::Result<(), ::std::string::String> {
                ::meridian_plugin_sdk::__report_panics();
                <$ty as ::meridian_plugin_sdk::Filter>::configure(&config)
            }
            fn inspect_request(
                request: ::meridian_plugin_sdk::RequestSummary,
                segments: ::std::vec::Vec<::meridian_plugin_sdk::Segment>,
            ) -> ::meridian_plugin_sdk::RequestVerdict {
                <$ty as ::meridian_plugin_sdk::Filter>::inspect_request(request, segments)
            }
            fn inspect_response(text: ::std::string::String) -> ::meridian_plugin_sdk::ResponseVerdict {
                <$ty as ::meridian_plugin_sdk::Filter>::inspect_response(text)
            }",
        ),
    ] {
        let with: String = shared
            .iter()
            .map(|i| {
                format!("\"meridian:plugin/{i}@0.1.3\": ::meridian_plugin_sdk::bindings::meridian::plugin::{i},\n")
            })
            .collect();
        out.push_str(&format!(
            r####"/// Generates the `{world}` world's exports in the calling crate for `$ty`.
#[doc(hidden)]
#[macro_export]
macro_rules! {macro_name} {{
    ($ty:ident) => {{
        #[doc(hidden)]
        mod {module} {{
            ::meridian_plugin_sdk::__wit_bindgen::generate!({{
                inline: r###"{wit}"###,
                world: "{world}",
                runtime_path: "::meridian_plugin_sdk::__wit_bindgen::rt",
                with: {{
                    {with}
                }},
            }});
        }}
        impl {module}::Guest for $ty {{
            {impl_body}
        }}
        {module}::export!($ty with_types_in {module});
    }};
}}
"####
        ));
    }
    let dest = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("world_macros.rs");
    std::fs::write(dest, out).expect("writing world_macros.rs");
}
