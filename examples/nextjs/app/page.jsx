export default function Home() {
  return <p>Open /profile/&lt;id&gt; for a profile page kept true by pg-cache-invalidator.</p>;
}
