// Appends a narrower cap and a path prefix to a Till key with the stock npm package
// @biscuit-auth/biscuit-wasm (spec/token.md §13): a block with no declaration whose
// Datalog is exactly Till's canonical rendering.
//
//   node --experimental-wasm-modules attenuate.mjs ROOT_PUB_JWK CAP PATH < key > new_key
//
// The package serialises only tokens whose root signature it verified, so it needs the
// root public key (the data dir's root.pub.jwk).
import { readFileSync } from "node:fs";
import { Biscuit, BlockBuilder, PublicKey, SignatureAlgorithm } from "@biscuit-auth/biscuit-wasm";

const [jwkPath, cap, path] = process.argv.slice(2);
const key = readFileSync(0, "utf8").trim();
if (!key.startsWith("till_")) throw new Error("not a Till key");
if (!/^\d+$/.test(cap) || !/^\/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*$/.test(path)) {
  throw new Error("usage: attenuate.mjs ROOT_PUB_JWK CAP PATH");
}
const jwk = JSON.parse(readFileSync(jwkPath, "utf8"));
const root = PublicKey.fromBytes(new Uint8Array(Buffer.from(jwk.x, "base64url")), SignatureAlgorithm.Ed25519);
const token = Biscuit.fromBytes(new Uint8Array(Buffer.from(key.slice(5), "base64url")), root);

const index = token.countBlocks(); // the cap check names the new block's own index
const pathCheck = path.endsWith("/")
  ? `till_path($p), $p.starts_with("${path}")`
  : `till_path($p), $p == "${path}" || $p.starts_with("${path}/")`;
const source = `check if ${pathCheck};\ncheck if till_activation(${index}, $n), $n <= ${cap};\n`;

const block = new BlockBuilder();
block.addCode(source);
const out = token.appendBlock(block);
if (out.getBlockSource(index) !== source) {
  throw new Error(`biscuit-wasm rendered ${JSON.stringify(out.getBlockSource(index))}`);
}
process.stdout.write("till_" + Buffer.from(out.toBytes()).toString("base64url") + "\n");
