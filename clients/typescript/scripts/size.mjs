// Prints the client's size as a browser would load it: dist/index.js bundled
// (with core.js) and minified by esbuild, then gzipped. A measurement, not a
// build step: dist/ is what ships.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const out = await build({
  entryPoints: ["dist/index.js"],
  bundle: true,
  minify: true,
  format: "esm",
  write: false,
  logLevel: "silent",
});
const code = out.outputFiles[0].contents;
const gz = gzipSync(code, { level: 9 });
console.log(`marketcast-client bundle: ${code.length} bytes minified, ${gz.length} bytes minified+gzip`);
