//! Generates the CSI gRPC code from the vendored `proto/csi.proto`.
//!
//! The proto is parsed with protox (pure Rust, so no `protoc` has to be
//! installed) into a file descriptor set, from which tonic-prost-build writes
//! the prost messages and the tonic clients and servers.
//!
//! CSI marks fields that carry credentials with the `csi_secret` field option.
//! A derived `Debug` would print them into any log line that formats a
//! request, so for every message with such a field this script turns prost's
//! derived `Debug` off and writes a replacement that prints every other field
//! as the derived one would and the secret ones as `<redacted: N keys>`. The
//! list of those messages comes from the descriptors, never from a
//! hand-maintained list, so a new CSI version cannot add an unredacted one.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use heck::{ToSnakeCase, ToUpperCamelCase};
use protox::prost_reflect::{
    Cardinality, DescriptorPool, ExtensionDescriptor, FieldDescriptor, Kind, MessageDescriptor,
    Value,
};

/// The proto package whose generated module `src/proto.rs` includes.
const CSI_PACKAGE: &str = "csi.v1";
/// The field option CSI puts on fields that may hold credentials.
const SECRET_OPTION: &str = "csi.v1.csi_secret";
/// Where, in `OUT_DIR`, the redacting `Debug` impls are written.
const REDACTED_DEBUG_FILE: &str = "csi.v1.redacted_debug.rs";
/// The node-local admin API (`liveclone status`, `liveclone hydration`).
const ADMIN_PROTO: &str = "liveclone_admin.proto";

fn main() -> Result<()> {
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR unset")?);
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR unset")?);
    let proto_dir = manifest_dir.join("proto");
    let proto_file = proto_dir.join("csi.proto");

    // Emitting any rerun-if-changed replaces Cargo's default (rerun when any
    // file of the package changes) with exactly these paths; a change to this
    // script rebuilds and so reruns it anyway.
    println!("cargo:rerun-if-changed={}", proto_file.display());

    let mut compiler = protox::Compiler::new([&proto_dir])
        .with_context(|| format!("setting up protox for {}", proto_dir.display()))?;
    // The same set protoc would give prost-build: imports for type
    // resolution, source info so that the proto comments become rustdoc.
    compiler.include_imports(true).include_source_info(true);
    compiler
        .open_file(&proto_file)
        .with_context(|| format!("parsing {}", proto_file.display()))?;

    let secret_messages = messages_with_secrets(&compiler.descriptor_pool())?;
    if secret_messages.is_empty() {
        // The spec has always had secrets in its requests; finding none means
        // the option lookup broke, not that there is nothing to redact.
        bail!("no field of {CSI_PACKAGE} carries the {SECRET_OPTION} option");
    }

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .skip_debug(
            secret_messages
                .iter()
                .map(|message| format!(".{}", message.descriptor.full_name())),
        )
        .compile_fds(compiler.file_descriptor_set())
        .context("generating Rust code from the CSI descriptors")?;

    // Our own node-local admin API: no secrets, plain generation.
    let admin_file = proto_dir.join(ADMIN_PROTO);
    println!("cargo:rerun-if-changed={}", admin_file.display());
    let admin = protox::compile([&admin_file], [&proto_dir])
        .with_context(|| format!("parsing {}", admin_file.display()))?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(admin)
        .context("generating Rust code from the admin descriptors")?;

    let redacted_debug = render_redacted_debug(&secret_messages);
    write_if_changed(&out_dir.join(REDACTED_DEBUG_FILE), &redacted_debug)
}

/// A message that has at least one field marked `csi_secret`.
struct SecretMessage {
    descriptor: MessageDescriptor,
    /// Names (proto spelling) of its fields that are marked secret.
    secret_fields: BTreeSet<String>,
}

/// Finds every message of the CSI package that has a field carrying the
/// secret option, checking that the replacement `Debug` can be written for it.
fn messages_with_secrets(pool: &DescriptorPool) -> Result<Vec<SecretMessage>> {
    let secret_option = pool
        .get_extension_by_name(SECRET_OPTION)
        .with_context(|| format!("csi.proto does not define the {SECRET_OPTION} option"))?;

    let mut found = Vec::new();
    for message in pool.all_messages() {
        if message.package_name() != CSI_PACKAGE || message.is_map_entry() {
            continue;
        }
        let secret_fields: BTreeSet<String> = message
            .fields()
            .filter(|field| is_secret(field, &secret_option))
            .map(|field| field.name().to_owned())
            .collect();
        if secret_fields.is_empty() {
            continue;
        }
        check_supported(&message)?;
        found.push(SecretMessage {
            descriptor: message,
            secret_fields,
        });
    }
    Ok(found)
}

fn is_secret(field: &FieldDescriptor, secret_option: &ExtensionDescriptor) -> bool {
    matches!(
        *field.options().get_extension(secret_option),
        Value::Bool(true)
    )
}

/// Refuses the shapes the `Debug` writer below does not handle, so that a
/// future spec that needs them fails here, with a reason, rather than
/// producing an impl that prints something else than the derived one.
fn check_supported(message: &MessageDescriptor) -> Result<()> {
    let name = message.full_name();
    // prost-build matches skip_debug paths by prefix too: nested types and
    // oneofs of this message would lose their Debug as well.
    if message.child_messages().any(|child| !child.is_map_entry()) {
        bail!("{name} has secrets and nested messages; teach build.rs to write their Debug");
    }
    if message.child_enums().len() > 0 {
        bail!("{name} has secrets and nested enums; teach build.rs to write their Debug");
    }
    if message.oneofs().any(|oneof| !oneof.is_synthetic()) {
        bail!("{name} has secrets and a oneof; teach build.rs to write its Debug");
    }
    for field in message.fields() {
        // The derived Debug prints enum fields by variant name, which a
        // plain `{:?}` of the stored i32 would not.
        let value_kind = if field.is_map() {
            match field.kind() {
                Kind::Message(entry) => entry.map_entry_value_field().kind(),
                other => other,
            }
        } else {
            field.kind()
        };
        if matches!(value_kind, Kind::Enum(_)) {
            bail!(
                "{name}.{} is an enum in a message with secrets; teach build.rs to print it by name",
                field.name()
            );
        }
    }
    Ok(())
}

/// Writes the `Debug` impls (and, for tests, a helper that formats every one
/// of these messages with canary secrets), to be included in the module of
/// the CSI package.
fn render_redacted_debug(messages: &[SecretMessage]) -> String {
    let mut out =
        String::from("// @generated by build.rs: Debug for messages with csi_secret fields.\n\n");
    for message in messages {
        render_debug_impl(&mut out, message);
    }
    render_canary_helper(&mut out, messages);
    out
}

fn render_debug_impl(out: &mut String, message: &SecretMessage) {
    let type_path = rust_type_path(&message.descriptor);
    let struct_name = rust_type_name(message.descriptor.name());
    // `write!` into a String cannot fail; the results are ignored for that
    // reason only.
    let _ = writeln!(out, "impl ::core::fmt::Debug for {type_path} {{");
    let _ = writeln!(
        out,
        "    fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {{"
    );
    let _ = writeln!(out, "        f.debug_struct({struct_name:?})");
    for field in message.descriptor.fields() {
        let rust_field = rust_field_name(field.name());
        let label = field.name();
        let value = if message.secret_fields.contains(field.name()) {
            redacted_expression(&field, &rust_field)
        } else {
            format!("&self.{rust_field}")
        };
        let _ = writeln!(out, "            .field({label:?}, {value})");
    }
    let _ = writeln!(out, "            .finish()");
    let _ = writeln!(out, "    }}");
    let _ = writeln!(out, "}}\n");
}

/// What a secret field prints as: how many entries it holds, never what.
fn redacted_expression(field: &FieldDescriptor, rust_field: &str) -> String {
    if field.is_map() {
        format!("&crate::proto::Redacted::Keys(self.{rust_field}.len())")
    } else if field.is_list() {
        format!("&crate::proto::Redacted::Items(self.{rust_field}.len())")
    } else {
        "&crate::proto::Redacted::Value".to_owned()
    }
}

/// Emits `debug_with_canary_secrets(canary)`, which returns, for every
/// message with secrets, its `Debug` output after its string secrets were
/// set to `canary`; a test checks that the canary never shows.
fn render_canary_helper(out: &mut String, messages: &[SecretMessage]) {
    let _ = writeln!(out, "#[cfg(test)]");
    let _ = writeln!(
        out,
        "pub(crate) fn debug_with_canary_secrets(canary: &str) -> ::std::vec::Vec<(&'static str, ::std::string::String)> {{"
    );
    let _ = writeln!(out, "    ::std::vec![");
    for message in messages {
        let type_path = rust_type_path(&message.descriptor);
        let _ = writeln!(out, "        ({:?}, {{", message.descriptor.full_name());
        let _ = writeln!(out, "            #[allow(unused_mut)]");
        let _ = writeln!(out, "            let mut message = {type_path}::default();");
        for field in message.descriptor.fields() {
            if !message.secret_fields.contains(field.name()) {
                continue;
            }
            let rust_field = rust_field_name(field.name());
            if let Some(fill) = canary_fill(&field, &rust_field) {
                let _ = writeln!(out, "            {fill}");
            }
        }
        let _ = writeln!(out, "            ::std::format!(\"{{message:?}}\")");
        let _ = writeln!(out, "        }}),");
    }
    let _ = writeln!(out, "    ]");
    let _ = writeln!(out, "}}");
}

/// A statement that puts the canary into a secret field, for the field types
/// CSI uses for secrets; other types are left at their default.
fn canary_fill(field: &FieldDescriptor, rust_field: &str) -> Option<String> {
    if field.is_map() {
        let Kind::Message(entry) = field.kind() else {
            return None;
        };
        let key_is_string = matches!(entry.map_entry_key_field().kind(), Kind::String);
        let value_is_string = matches!(entry.map_entry_value_field().kind(), Kind::String);
        return (key_is_string && value_is_string).then(|| {
            format!("message.{rust_field}.insert(canary.to_owned(), canary.to_owned());")
        });
    }
    match (field.cardinality(), field.kind()) {
        (Cardinality::Repeated, Kind::String) => {
            Some(format!("message.{rust_field}.push(canary.to_owned());"))
        }
        (_, Kind::String) if field.supports_presence() => {
            Some(format!("message.{rust_field} = Some(canary.to_owned());"))
        }
        (_, Kind::String) => Some(format!("message.{rust_field} = canary.to_owned();")),
        _ => None,
    }
}

/// The path of a message's Rust type relative to its package's module, the
/// way prost-build names it: enclosing messages become `snake_case` modules.
fn rust_type_path(message: &MessageDescriptor) -> String {
    let mut segments = vec![rust_type_name(message.name())];
    let mut parent = message.parent_message();
    while let Some(enclosing) = parent {
        segments.push(rust_ident(&enclosing.name().to_snake_case()));
        parent = enclosing.parent_message();
    }
    segments.reverse();
    segments.join("::")
}

fn rust_type_name(proto_name: &str) -> String {
    rust_ident(&proto_name.to_upper_camel_case())
}

fn rust_field_name(proto_name: &str) -> String {
    rust_ident(&proto_name.to_snake_case())
}

/// Escapes identifiers that collide with Rust keywords, as prost-build does.
fn rust_ident(ident: &str) -> String {
    match ident {
        "as" | "break" | "const" | "continue" | "else" | "enum" | "false" | "fn" | "for" | "if"
        | "impl" | "in" | "let" | "loop" | "match" | "mod" | "move" | "mut" | "pub" | "ref"
        | "return" | "static" | "struct" | "trait" | "true" | "type" | "unsafe" | "use"
        | "where" | "while" | "dyn" | "abstract" | "become" | "box" | "do" | "final" | "macro"
        | "override" | "priv" | "typeof" | "unsized" | "virtual" | "yield" | "async" | "await"
        | "try" | "gen" => format!("r#{ident}"),
        "_" | "super" | "self" | "Self" | "extern" | "crate" => format!("{ident}_"),
        _ if ident.starts_with(|c: char| c.is_ascii_digit()) => format!("_{ident}"),
        _ => ident.to_owned(),
    }
}

/// Leaves an unchanged file untouched so that its mtime does not force the
/// crate to recompile.
fn write_if_changed(path: &Path, contents: &str) -> Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|existing| existing == contents) {
        return Ok(());
    }
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
